//! Service-usage monitoring, black box: a real engine on 127.0.0.1:0, real HTTP requests, and
//! the text exposition scraped from `GET /metrics` on the admin listener. Covers the policy
//! service context per client (registered ids only), node metrics, node-level service contexts
//! and composite contexts, a filter's `monitoring.enabled`, refresh outcomes and tokens issued,
//! reloads, process and build metrics, and the bounded series count.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use serde_json::Value;
use tests::*;

const TOKEN: &str = "/oauth/token";

// ---------------------------------------------------------------------------------------------
// The text exposition, parsed.

/// One sample line of the exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape of `/metrics`, raw and parsed.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("unparsable sample line: {l:?}")))
            .collect();
        Scrape { text, samples }
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> Vec<&'a Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The sum of the matching samples; `None` when no series matches.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let m = self.matching(name, labels);
        (!m.is_empty()).then(|| m.iter().map(|s| s.value).sum())
    }

    /// Like [`Scrape::value`], but the series must exist.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name}{labels:?} in the scrape; {name} series present:\n{}",
                self.dump(name)
            )
        })
    }

    /// How much the matching series grew since `before`.
    fn delta(&self, before: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels) - before.value(name, labels).unwrap_or(0.0)
    }

    /// Every series of one metric, for failure messages.
    fn dump(&self, name: &str) -> String {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| format!("  {:?} {}", s.labels, s.value))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Distinct values of one label over the non-zero series of `name`.
    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.value != 0.0)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Whether `needle` occurs anywhere in the exposition (names, labels, help texts).
    fn mentions(&self, needle: &str) -> bool {
        self.text.contains(needle)
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches(',');
            if let Some(after) = r.strip_prefix('}') {
                break after;
            }
            let eq = r.find('=')?;
            let key = r[..eq].to_owned();
            let mut chars = r[eq + 1..].strip_prefix('"')?.char_indices();
            let mut value = String::new();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            };
            labels.insert(key, value);
            r = &r[eq + 1 + 1 + end + 1..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

async fn scrape(gw: &Gateway) -> Scrape {
    let r = get(gw.admin_addr, "/metrics").await;
    assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
    Scrape::parse(r.text())
}

// ---------------------------------------------------------------------------------------------
// Policies and traffic.

/// `GET /whoami` with `x-client: ID`: puts the header into `authentication.subject.id` (the
/// default client attribute) and answers 200. Its service context is `whoami`.
const WHOAMI: &str = r#"
policies:
  - name: whoami
    route: { path: /whoami, methods: [GET] }
    chain:
      - name: identify
        type: set_attribute
        attribute: authentication.subject.id
        value: "${http.header.x-client}"
      - name: answer
        type: set_response
        body: hello
"#;

/// `GET path` with `x-client: client`, the header the test policies put in the client
/// attribute.
async fn get_as(addr: SocketAddr, path: &str, client: &str) -> Resp {
    send(
        addr,
        request(Method::GET, path)
            .header("x-client", client)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

async fn whoami(addr: SocketAddr, client: &str) -> Resp {
    get_as(addr, "/whoami", client).await
}

/// The registered client ids are loaded into the metrics' label set by a task that starts with
/// the engine; wait until `id` is a label of the `whoami` probe service.
async fn wait_known_client(gw: &Gateway, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(whoami(gw.public_addr, id).await.status, 200);
        let s = scrape(gw).await;
        if s.value(
            "gateway_service_requests_total",
            &[("service", "whoami"), ("client", id)],
        )
        .is_some()
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the registered client {id} never became a client label:\n{}",
            s.dump("gateway_service_requests_total")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the engine on `files` (plus the monitoring settings and the `whoami` probe) with one
/// client registered for `grants`, once its id is a client label; returns (id, secret).
async fn start_with_client(
    files: &[(&str, &str)],
    grants: &str,
) -> (PolicyDir, Gateway, String, String) {
    let mut all = vec![("gateway.yaml", SETTINGS), ("whoami.yaml", WHOAMI)];
    all.extend_from_slice(files);
    let dir = PolicyDir::new(&all);
    let (id, secret) = add_client(dir.path(), "read", grants).await;
    let gw = dir.start().await;
    wait_known_client(&gw, &id).await;
    (dir, gw, id, secret)
}

async fn token_post(addr: SocketAddr, auth: &str, form: &[(&str, &str)]) -> Resp {
    token_post_at(addr, TOKEN, auth, form).await
}

/// A form posted to the token endpoint at `path`, with `auth` as the Authorization header.
async fn token_post_at(addr: SocketAddr, path: &str, auth: &str, form: &[(&str, &str)]) -> Resp {
    post_form(addr, path, &[("authorization", auth)], form).await
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// A registered client on the default token endpoint (`policies/token.yaml`, service
/// `oauth-token`) plus the `whoami` probe.
struct TokenSetup {
    _dir: PolicyDir,
    gw: Gateway,
    id: String,
    secret: String,
}

impl TokenSetup {
    async fn new() -> TokenSetup {
        let token = default_token_policy();
        let (dir, gw, id, secret) = start_with_client(
            &[("token.yaml", &token)],
            "client_credentials,refresh_token",
        )
        .await;
        TokenSetup {
            _dir: dir,
            gw,
            id,
            secret,
        }
    }

    async fn client_credentials(&self) -> Value {
        let r = token_post(
            self.gw.public_addr,
            &basic(&self.id, &self.secret),
            &[("grant_type", "client_credentials"), ("scope", "read")],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn policy_service_context_is_counted_per_registered_client_and_never_leaks_secrets() {
    let t = TokenSetup::new().await;
    let addr = t.gw.public_addr;
    let base = scrape(&t.gw).await;
    let pair = t.client_credentials().await;
    let access = s(&pair, "access_token").to_owned();
    let refresh = s(&pair, "refresh_token").to_owned();

    // Failures: a wrong secret for the registered id, and an id nobody registered.
    let unregistered = "unregistered-app-7f3a";
    let wrong_secret = "not-the-secret-Zq81";
    let r = token_post(
        addr,
        &basic(&t.id, wrong_secret),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = token_post(
        addr,
        &basic(unregistered, wrong_secret),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    // A random id lands in the client attribute itself: it is counted, as `other`.
    let random = "random-client-id-91c2e";
    assert_eq!(whoami(addr, random).await.status, 200);
    // Tokens and secrets in the client attribute never become labels either.
    assert_eq!(whoami(addr, &access).await.status, 200);
    assert_eq!(whoami(addr, &t.secret).await.status, 200);

    let m = scrape(&t.gw).await;
    let svc = "gateway_service_requests_total";
    assert_eq!(
        m.get(
            svc,
            &[
                ("service", "oauth-token"),
                ("client", &t.id),
                ("outcome", "success")
            ]
        ),
        1.0,
        "the successful grant is counted under the registered client id:\n{}",
        m.dump(svc)
    );
    assert_eq!(
        m.get(svc, &[("service", "oauth-token"), ("outcome", "failure")]),
        2.0,
        "both rejected grants are failures of the token endpoint:\n{}",
        m.dump(svc)
    );
    assert_eq!(
        m.value(
            svc,
            &[
                ("service", "oauth-token"),
                ("client", &t.id),
                ("outcome", "failure")
            ]
        )
        .unwrap_or(0.0),
        0.0,
        "a client that failed to authenticate is not counted under the id it claimed:\n{}",
        m.dump(svc)
    );
    assert_eq!(
        m.delta(
            &base,
            svc,
            &[
                ("service", "whoami"),
                ("client", "other"),
                ("outcome", "success")
            ]
        ),
        3.0,
        "unregistered values of the client attribute are `other`:\n{}",
        m.dump(svc)
    );
    // The duration histogram has the same labels and the documented buckets.
    let hist = "gateway_service_request_duration_seconds_bucket";
    let labels = [
        ("service", "oauth-token"),
        ("client", t.id.as_str()),
        ("outcome", "success"),
    ];
    let mut les = m
        .matching(hist, &labels)
        .iter()
        .map(|s| s.labels["le"].clone())
        .collect::<Vec<_>>();
    les.sort_by(|a, b| {
        let f = |x: &str| x.parse::<f64>().unwrap_or(f64::INFINITY);
        f(a).total_cmp(&f(b))
    });
    assert_eq!(les.first().map(String::as_str), Some("0.0005"), "{les:?}");
    assert!(les.iter().any(|l| l == "10"), "{les:?}");
    assert_eq!(
        m.get(hist, &[labels[0], labels[1], labels[2], ("le", "+Inf")]),
        1.0
    );
    assert_eq!(
        m.get("gateway_service_request_duration_seconds_count", &labels),
        1.0
    );

    // Only registered ids, `other` and `anonymous` are client labels, in every family.
    for sample in &m.samples {
        if let Some(c) = sample.labels.get("client") {
            assert!(
                *c == t.id || c == "other" || c == "anonymous",
                "unexpected client label {c:?} on {sample:?}"
            );
        }
    }
    for (what, needle) in [
        ("the unregistered id", unregistered),
        ("the random id", random),
        ("the wrong secret", wrong_secret),
        ("the client secret", t.secret.as_str()),
        ("the access token", access.as_str()),
        ("the refresh token", refresh.as_str()),
    ] {
        assert!(
            !m.mentions(needle),
            "{what} appears in the scrape:\n{}",
            m.text
        );
    }
}

#[tokio::test]
async fn node_metrics_are_counted_per_policy_node_and_outcome() {
    let t = TokenSetup::new().await;
    let addr = t.gw.public_addr;
    // Two client-credentials grants, one unsupported grant type, one without grant_type.
    t.client_credentials().await;
    t.client_credentials().await;
    let auth = basic(&t.id, &t.secret);
    let r = token_post(addr, &auth, &[("grant_type", "password")]).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = token_post(addr, &auth, &[("scope", "read")]).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // One rejected client-credentials grant (wrong secret).
    let r = token_post(
        addr,
        &basic(&t.id, "wrong"),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());

    let m = scrape(&t.gw).await;
    let n = "gateway_node_requests_total";
    let count = |node: &str, outcome: &str| {
        m.get(
            n,
            &[
                ("policy", "token-endpoint"),
                ("node", node),
                ("outcome", outcome),
            ],
        )
    };
    // has-grant-type: 4 pass (cc, cc, password, bad secret), 1 fails (no grant_type).
    assert_eq!(count("has-grant-type", "success"), 4.0, "{}", m.dump(n));
    assert_eq!(count("has-grant-type", "failure"), 1.0, "{}", m.dump(n));
    // is-refresh fails for every grant that got there (none is a refresh).
    assert_eq!(count("is-refresh", "success"), 0.0, "{}", m.dump(n));
    assert_eq!(count("is-refresh", "failure"), 4.0, "{}", m.dump(n));
    assert_eq!(
        count("is-client-credentials", "success"),
        3.0,
        "{}",
        m.dump(n)
    );
    assert_eq!(
        count("is-client-credentials", "failure"),
        1.0,
        "{}",
        m.dump(n)
    );
    assert_eq!(count("client-credentials", "success"), 2.0, "{}", m.dump(n));
    assert_eq!(count("client-credentials", "failure"), 1.0, "{}", m.dump(n));
    assert_eq!(
        count("client-credentials", "exception"),
        0.0,
        "{}",
        m.dump(n)
    );
    // The set_response nodes answered 400: a failure of the node that answered.
    assert_eq!(
        count("unsupported-grant-type", "failure"),
        1.0,
        "{}",
        m.dump(n)
    );
    assert_eq!(count("missing-grant-type", "failure"), 1.0, "{}", m.dump(n));
    // The refresh node never ran.
    assert_eq!(
        m.value(n, &[("policy", "token-endpoint"), ("node", "refresh")])
            .unwrap_or(0.0),
        0.0,
        "{}",
        m.dump(n)
    );
    // The duration histogram follows the counter.
    assert_eq!(
        m.get(
            "gateway_node_duration_seconds_count",
            &[
                ("policy", "token-endpoint"),
                ("node", "client-credentials"),
                ("outcome", "success")
            ]
        ),
        2.0
    );
    // Node labels come from configuration only.
    let nodes = m.label_values(n, "node");
    for node in &nodes {
        assert!(
            [
                "has-grant-type",
                "is-refresh",
                "refresh",
                "is-client-credentials",
                "client-credentials",
                "unsupported-grant-type",
                "missing-grant-type",
                "identify",
                "answer",
            ]
            .contains(&node.as_str()),
            "unexpected node label {node:?} in {nodes:?}"
        );
    }
}

/// serviceA then serviceB on nodes, and a composite `checkout` around them on the policy.
/// `x-a: ok` / `x-b: ok` make each step pass; serviceB's failure is handled on a failure path
/// that still answers 200, so only the composite (and serviceB) show it.
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
        on_failure: b-fallback
      - name: done
        type: set_response
        body: done
      - name: b-fallback
        type: set_response
        body: fallback
"#;

async fn checkout(addr: SocketAddr, client: &str, a: &str, b: &str) -> Resp {
    send(
        addr,
        request(Method::GET, "/checkout")
            .header("x-client", client)
            .header("x-a", a)
            .header("x-b", b)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn node_service_contexts_and_a_composite_that_succeeds_only_if_all_succeed() {
    let (_dir, gw, id, _) = start_with_client(&[("shop.yaml", SHOP)], "client_credentials").await;
    let addr = gw.public_addr;

    let m = scrape(&gw).await;
    assert_eq!(
        m.value("gateway_composite_requests_total", &[])
            .unwrap_or(0.0),
        0.0,
        "nothing ran yet:\n{}",
        m.dump("gateway_composite_requests_total")
    );

    // A ok + B ok, three times: the composite succeeds.
    for _ in 0..3 {
        let r = checkout(addr, &id, "ok", "ok").await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "done"));
    }
    // A ok + B failing, twice: the request is answered (200) but the composite fails.
    for _ in 0..2 {
        let r = checkout(addr, &id, "ok", "no").await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "fallback"));
    }
    // A failing: B never runs; the request is a 403 and the composite fails.
    let r = checkout(addr, &id, "no", "ok").await;
    assert_eq!(r.status, 403, "{}", r.text());

    let m = scrape(&gw).await;
    let svc = "gateway_service_requests_total";
    let comp = "gateway_composite_requests_total";
    let service = |name: &str, outcome: &str| {
        m.value(
            svc,
            &[("service", name), ("client", &id), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(service("serviceA", "success"), 5.0, "{}", m.dump(svc));
    assert_eq!(service("serviceA", "failure"), 1.0, "{}", m.dump(svc));
    assert_eq!(service("serviceB", "success"), 3.0, "{}", m.dump(svc));
    assert_eq!(service("serviceB", "failure"), 2.0, "{}", m.dump(svc));
    // The policy's own context sees the answers: five 200s and one 403.
    assert_eq!(service("shop", "success"), 5.0, "{}", m.dump(svc));
    assert_eq!(service("shop", "failure"), 1.0, "{}", m.dump(svc));

    let composite = |outcome: &str| {
        m.value(
            comp,
            &[
                ("composite", "checkout"),
                ("client", &id),
                ("outcome", outcome),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(composite("success"), 3.0, "A ok + B ok:\n{}", m.dump(comp));
    assert_eq!(
        composite("failure"),
        3.0,
        "A ok + B failing (2) and A failing (1):\n{}",
        m.dump(comp)
    );
    assert_eq!(composite("exception"), 0.0, "{}", m.dump(comp));
    assert_eq!(
        m.label_values(comp, "composite"),
        vec!["checkout".to_owned()],
        "the composite is exported as its own series"
    );
    assert!(
        !m.label_values(svc, "service")
            .contains(&"checkout".to_owned()),
        "the composite is not a service context"
    );
    assert_eq!(
        m.get(
            "gateway_composite_request_duration_seconds_count",
            &[("composite", "checkout"), ("client", &id)]
        ),
        6.0
    );
}

/// The token endpoint's grant dispatch with a composite `token-flow`, declared on the policy
/// (around the `cc` and `refresh` nodes' service contexts, their filters' monitoring) or by the
/// refresh filter's `composite_context` (from that filter on); and the service contexts.
fn composite_token_policy(on_the_policy: bool) -> (String, &'static [&'static str]) {
    if on_the_policy {
        let policy = tests::dispatch_policy("", "").replacen(
            "    chain:",
            "    monitoring: { composite: token-flow }\n    chain:",
            1,
        );
        (policy, &["cc", "refresh"])
    } else {
        let refresh = "        monitoring: { composite_context: true, service: token-flow }";
        (tests::dispatch_policy("", refresh), &["cc"])
    }
}

#[tokio::test]
async fn a_composite_takes_the_time_of_the_chain_around_its_services() {
    for on_the_policy in [true, false] {
        let (policy, services) = composite_token_policy(on_the_policy);
        let (_dir, gw, id, secret) = start_with_client(
            &[("token.yaml", &policy)],
            "client_credentials,refresh_token",
        )
        .await;
        refresh_traffic(gw.public_addr, &basic(&id, &secret)).await;

        let m = scrape(&gw).await;
        let comp = "gateway_composite_request_duration_seconds";
        let svc = "gateway_service_request_duration_seconds";
        let composite = m.get(&format!("{comp}_sum"), &[("composite", "token-flow")]);
        let count = m.get(&format!("{comp}_count"), &[("composite", "token-flow")]);
        let requests = m.get(&format!("{svc}_sum"), &[("service", "token")]);
        let form = if on_the_policy { "policy" } else { "filter" };
        let mut contexts: Vec<String> = ["token", "whoami"]
            .iter()
            .chain(services)
            .map(|s| s.to_string())
            .collect();
        contexts.sort();
        assert_eq!(
            m.label_values("gateway_service_requests_total", "service"),
            contexts,
            "{form}: the composite is not a service context"
        );
        if on_the_policy {
            // Six requests, each through the composite once.
            assert_eq!(count, 6.0, "{}", m.dump(&format!("{comp}_count")));
            // The policy's composite takes the request's time, as the policy's own context does;
            // the grant nodes' times are parts of it. A composite timed apart from its services
            // (the time it takes to record them) is far below their sum: a grant node hashes,
            // draws and stores tokens.
            assert!(
                (composite - requests).abs() <= requests * 1e-9,
                "composite {composite} s, the requests {requests} s"
            );
            let inside: f64 = services
                .iter()
                .map(|s| m.get(&format!("{svc}_sum"), &[("service", s)]))
                .sum();
            assert!(
                composite >= inside,
                "composite {composite} s < its services' {inside} s"
            );
        } else {
            // Only the four refresh requests reach the filter; the composite starts there, and
            // as the refresh filter answers, it ends with it: its time is the node's.
            assert_eq!(count, 4.0, "{}", m.dump(&format!("{comp}_count")));
            let node = m.get(
                "gateway_node_duration_seconds_sum",
                &[("policy", "token"), ("node", "refresh")],
            );
            assert!(
                (composite - node).abs() <= node * 1e-9,
                "composite {composite} s, the refresh node {node} s"
            );
        }
        assert!(
            composite <= requests,
            "{form}: composite {composite} s > the requests' {requests} s"
        );
    }
}

/// A composite on the policy and another declared by the grant filter. The grant sets its own
/// client attribute (`app.caller`) to the client's id, which labels the filter's composite; the
/// policy's attribute (`authentication.subject.id`) stays unset, so its composite's client is
/// `anonymous`.
const TWO_COMPOSITES: &str = r#"
policies:
  - name: flows
    route: { path: /flows-token, methods: [POST] }
    monitoring: { composite: policy-flow }
    chain:
      - name: grant
        type: client_credentials
        application_validation: { client_credentials_in: authorization_header }
        access_token: { store: tokens, expiry_secs: 3600, length: 54, type: Bearer }
        monitoring: { composite_context: true, service: grant-flow, client_attribute: app.caller }
"#;

#[tokio::test]
async fn every_composite_is_recorded_and_labelled_by_its_own_client_attribute() {
    let (_dir, gw, id, secret) =
        start_with_client(&[("flows.yaml", TWO_COMPOSITES)], "client_credentials").await;
    let auth = basic(&id, &secret);
    let r = token_post_at(
        gw.public_addr,
        "/flows-token",
        &auth,
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = scrape(&gw).await;
    let comp = "gateway_composite_requests_total";
    let count = |composite: &str, client: &str| {
        m.value(
            comp,
            &[
                ("composite", composite),
                ("client", client),
                ("outcome", "success"),
            ],
        )
    };
    assert_eq!(
        count("policy-flow", "anonymous"),
        Some(1.0),
        "the policy's composite, labelled by the policy's attribute:\n{}",
        m.dump(comp)
    );
    assert_eq!(
        count("grant-flow", &id),
        Some(1.0),
        "the filter's composite beside the policy's, labelled by the filter's attribute:\n{}",
        m.dump(comp)
    );
    assert_eq!(m.get(comp, &[]), 2.0, "{}", m.dump(comp));
}

/// A node whose service context is the policy's own (`service: same`, the policy's name).
const SAME_CONTEXT: &str = r#"
policies:
  - name: same
    route: { path: /same, methods: [GET] }
    chain:
      - name: identify
        type: set_attribute
        attribute: authentication.subject.id
        value: "${http.header.x-client}"
      - name: answer
        service: same
        type: set_response
        body: same
"#;

#[tokio::test]
async fn a_node_in_the_policys_own_context_does_not_count_the_request_twice() {
    let (_dir, gw, id, _) =
        start_with_client(&[("same.yaml", SAME_CONTEXT)], "client_credentials").await;
    for _ in 0..3 {
        let r = get_as(gw.public_addr, "/same", &id).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let m = scrape(&gw).await;
    let svc = "gateway_service_requests_total";
    assert_eq!(
        m.get(svc, &[("service", "same")]),
        3.0,
        "three requests:\n{}",
        m.dump(svc)
    );
    assert_eq!(
        m.get(
            "gateway_service_request_duration_seconds_count",
            &[("service", "same")]
        ),
        3.0
    );
}

/// A token endpoint whose policy has monitoring off; its grant filter's own setting is left at
/// its default (on).
const SILENT_TOKEN: &str = r#"
policies:
  - name: silent-token
    route: { path: /silent-token, methods: [POST] }
    monitoring: { enabled: false }
    chain:
      - name: grant
        type: client_credentials
        application_validation: { client_credentials_in: authorization_header }
        access_token: { store: tokens, expiry_secs: 3600, length: 54, type: Bearer }
"#;

#[tokio::test]
async fn a_policy_with_monitoring_off_counts_no_tokens_nor_store_operations() {
    let (_dir, gw, id, secret) =
        start_with_client(&[("silent.yaml", SILENT_TOKEN)], "client_credentials").await;
    let auth = basic(&id, &secret);
    let r = token_post_at(
        gw.public_addr,
        "/silent-token",
        &auth,
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = scrape(&gw).await;
    for name in [
        "gateway_tokens_issued_total",
        "gateway_store_operation_duration_seconds_count",
    ] {
        let recorded: f64 = m.matching(name, &[]).iter().map(|s| s.value).sum();
        assert_eq!(recorded, 0.0, "{name}:\n{}", m.dump(name));
    }
}

/// Two walks that break off inside a composite, after a node of context `ident` has run:
/// `/slow` waits past the request timeout in a node of context `backend` (504), `/boom`
/// panics in a node of context `exploding` (500).
const BROKEN: &str = r#"
policies:
  - name: slow
    route: { path: /slow, methods: [GET] }
    monitoring: { composite: slow-flow }
    chain:
      - name: who
        service: ident
        type: set_attribute
        attribute: authentication.subject.id
        value: "${http.header.x-client}"
      - { name: wait, service: backend, type: test_sleep, ms: 5000 }
  - name: boom
    route: { path: /boom, methods: [GET] }
    monitoring: { composite: boom-flow }
    chain:
      - name: who
        service: ident
        type: set_attribute
        attribute: authentication.subject.id
        value: "${http.header.x-client}"
      - { name: explode, service: exploding, type: test_panic }
"#;

#[tokio::test]
async fn a_walk_that_times_out_or_panics_records_where_it_broke_off() {
    let settings = format!("{SETTINGS}limits: {{ request_timeout_secs: 1 }}\n");
    let dir = PolicyDir::new(&[("gateway.yaml", &settings), ("whoami.yaml", WHOAMI)]);
    let (id, _) = add_client(dir.path(), "read", "client_credentials").await;
    // Written after the client: the registry tool does not know the test kinds.
    dir.write("broken.yaml", BROKEN);
    let gw = dir.start_with(test_kinds::KINDS).await;
    wait_known_client(&gw, &id).await;
    for (path, status) in [("/slow", 504), ("/boom", 500)] {
        let r = get_as(gw.public_addr, path, &id).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
    }
    let m = scrape(&gw).await;
    let svc = "gateway_service_requests_total";
    let node = "gateway_node_requests_total";
    let comp = "gateway_composite_requests_total";
    for (policy, waiting, composite) in [
        ("slow", ("wait", "backend"), "slow-flow"),
        ("boom", ("explode", "exploding"), "boom-flow"),
    ] {
        let exception = |name: &str, labels: &[(&str, &str)]| {
            let mut all = labels.to_vec();
            all.extend([("client", id.as_str()), ("outcome", "exception")]);
            m.value(name, &all)
        };
        // The request, labelled by the client the chain had identified.
        assert_eq!(
            exception(svc, &[("service", policy)]),
            Some(1.0),
            "{policy}:\n{}",
            m.dump(svc)
        );
        // The node it broke off in, and that node's context, as exceptions.
        assert_eq!(
            m.value(
                node,
                &[
                    ("policy", policy),
                    ("node", waiting.0),
                    ("outcome", "exception")
                ]
            ),
            Some(1.0),
            "{policy}:\n{}",
            m.dump(node)
        );
        assert_eq!(
            exception(svc, &[("service", waiting.1)]),
            Some(1.0),
            "{policy}:\n{}",
            m.dump(svc)
        );
        assert_eq!(
            exception(comp, &[("composite", composite)]),
            Some(1.0),
            "{policy}:\n{}",
            m.dump(comp)
        );
    }
    // The node before, in both policies: its context passed.
    assert_eq!(
        m.value(
            svc,
            &[
                ("service", "ident"),
                ("client", &id),
                ("outcome", "success")
            ]
        ),
        Some(2.0),
        "{}",
        m.dump(svc)
    );
    // The timed-out node's time runs to the deadline (1 s), not to its own end (5 s).
    let waited = m.get(
        "gateway_node_duration_seconds_sum",
        &[("policy", "slow"), ("node", "wait")],
    );
    assert!((0.9..3.0).contains(&waited), "{waited} s");
}

/// A grant_type dispatch between a client_credentials node `cc` and a refresh node `refresh`,
/// both with the given `monitoring.enabled`.
fn dispatch_policy(enabled: bool) -> String {
    let monitoring = format!("        monitoring: {{ enabled: {enabled} }}");
    tests::dispatch_policy(&monitoring, &monitoring)
}

/// Two client-credentials grants, two good refreshes, one reuse of a rotated refresh token,
/// one unknown refresh token.
async fn refresh_traffic(addr: SocketAddr, auth: &str) {
    let cc = || token_post(addr, auth, &[("grant_type", "client_credentials")]);
    let refresh = |rt: String| async move {
        token_post(
            addr,
            auth,
            &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
        )
        .await
    };

    let r = cc().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rt1 = s(&r.json(), "refresh_token").to_owned();
    let r = refresh(rt1.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = refresh(rt1).await;
    assert_eq!(r.status, 400, "reuse of a rotated token: {}", r.text());
    assert_eq!(r.json()["error"], "invalid_grant");
    let r = refresh("no-such-refresh-token-0123456789".into()).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "invalid_grant");
    let r = cc().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rt3 = s(&r.json(), "refresh_token").to_owned();
    let r = refresh(rt3).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

async fn refresh_engine(enabled: bool) -> (PolicyDir, Gateway, String) {
    let dir = PolicyDir::new(&[
        ("gateway.yaml", SETTINGS),
        ("token.yaml", &dispatch_policy(enabled)),
    ]);
    let (id, secret) = add_client(dir.path(), "read", "client_credentials,refresh_token").await;
    let gw = dir.start().await;
    refresh_traffic(gw.public_addr, &basic(&id, &secret)).await;
    (dir, gw, id)
}

#[tokio::test]
async fn filter_monitoring_enabled_counts_refresh_outcomes_and_tokens_issued() {
    let (_dir, gw, _) = refresh_engine(true).await;
    let m = scrape(&gw).await;
    let refresh = |o: &str| m.get("gateway_refresh_total", &[("outcome", o)]);
    let all = m.dump("gateway_refresh_total");
    assert_eq!(refresh("ok"), 2.0, "{all}");
    assert_eq!(refresh("reuse_detected"), 1.0, "{all}");
    assert_eq!(refresh("invalid_grant"), 1.0, "{all}");
    assert_eq!(refresh("invalid_client"), 0.0, "{all}");
    let issued = |g: &str| m.get("gateway_tokens_issued_total", &[("grant_type", g)]);
    let all = m.dump("gateway_tokens_issued_total");
    assert_eq!(issued("client_credentials"), 2.0, "{all}");
    assert_eq!(issued("refresh_token"), 2.0, "{all}");
    assert_eq!(issued("password"), 0.0, "{all}");

    let n = "gateway_node_requests_total";
    let node =
        |name: &str, o: &str| m.get(n, &[("policy", "token"), ("node", name), ("outcome", o)]);
    assert_eq!(node("cc", "success"), 2.0, "{}", m.dump(n));
    assert_eq!(node("refresh", "success"), 2.0, "{}", m.dump(n));
    assert_eq!(node("refresh", "failure"), 2.0, "{}", m.dump(n));
    assert_eq!(node("is-cc", "success"), 2.0, "{}", m.dump(n));
    assert_eq!(node("is-cc", "failure"), 4.0, "{}", m.dump(n));
}

#[tokio::test]
async fn filter_monitoring_disabled_records_nothing_for_that_node() {
    let (_dir, gw, _) = refresh_engine(false).await;
    let m = scrape(&gw).await;
    let all = m.dump("gateway_refresh_total");
    for s in m.matching("gateway_refresh_total", &[]) {
        assert_eq!(
            s.value, 0.0,
            "refresh outcomes counted while disabled:\n{all}"
        );
    }
    let all = m.dump("gateway_tokens_issued_total");
    for s in m.matching("gateway_tokens_issued_total", &[]) {
        assert_eq!(s.value, 0.0, "tokens counted while disabled:\n{all}");
    }
    let n = "gateway_node_requests_total";
    for node in ["cc", "refresh"] {
        assert!(
            m.matching(n, &[("node", node)]).is_empty()
                && m.matching("gateway_node_duration_seconds_count", &[("node", node)])
                    .is_empty(),
            "node {node} has series although its monitoring is disabled:\n{}",
            m.dump(n)
        );
        assert!(
            m.matching("gateway_service_requests_total", &[("service", node)])
                .is_empty(),
            "node {node} has a service context although its monitoring is disabled"
        );
    }
    // The other node of the policy, and the policy itself, are still recorded.
    assert_eq!(
        m.get(
            n,
            &[
                ("policy", "token"),
                ("node", "is-cc"),
                ("outcome", "failure")
            ]
        ),
        4.0,
        "{}",
        m.dump(n)
    );
    assert_eq!(
        m.get("gateway_service_requests_total", &[("service", "token")]),
        6.0,
        "{}",
        m.dump("gateway_service_requests_total")
    );
}

#[tokio::test]
async fn reloads_are_counted_by_result() {
    let dir = PolicyDir::new(&[("whoami.yaml", WHOAMI)]);
    let gw = dir.start().await;
    let reloads =
        |m: &Scrape, result: &str| m.get("gateway_policy_reloads_total", &[("result", result)]);
    let m = scrape(&gw).await;
    assert_eq!((reloads(&m, "ok"), reloads(&m, "error")), (0.0, 0.0));

    let r = tests::post_reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = scrape(&gw).await;
    assert_eq!((reloads(&m, "ok"), reloads(&m, "error")), (1.0, 0.0));

    dir.write("broken.yaml", "policies:\n  - name: broken\n    chain: 7\n");
    let r = tests::post_reload(&gw).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let m = scrape(&gw).await;
    assert_eq!((reloads(&m, "ok"), reloads(&m, "error")), (1.0, 1.0));

    std::fs::remove_file(dir.path().join("broken.yaml")).unwrap();
    let r = tests::post_reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = scrape(&gw).await;
    assert_eq!((reloads(&m, "ok"), reloads(&m, "error")), (2.0, 1.0));
}

#[tokio::test]
async fn process_and_build_metrics_are_exported_on_the_admin_listener_only() {
    let dir = PolicyDir::new(&[("gateway.yaml", SETTINGS), ("whoami.yaml", WHOAMI)]);
    let gw = dir.start().await;
    let r = get(gw.admin_addr, "/metrics").await;
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "content type {ct:?}"
    );
    let m = Scrape::parse(r.text());
    let rss = m.get("process_resident_memory_bytes", &[]);
    assert!(rss > 1_000_000.0, "resident memory {rss}");
    assert!(m.get("process_open_fds", &[]) > 0.0);
    assert!(m.value("process_cpu_seconds_total", &[]).is_some());
    assert!(m.get("process_start_time_seconds", &[]) > 1.6e9);
    assert_eq!(
        m.get(
            "gateway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0,
        "{}",
        m.dump("gateway_build_info")
    );
    // The store registered at start-up has its gauges before any traffic.
    assert_eq!(
        m.get("gateway_store_live_tokens", &[("store", "tokens")]),
        0.0,
        "{}",
        m.dump("gateway_store_live_tokens")
    );
    assert!(
        m.value("gateway_requests_in_flight", &[]).is_some()
            && m.value("gateway_connections_open", &[]).is_some()
    );
    // Every sample has HELP and TYPE lines.
    let mut names: Vec<&str> = m.samples.iter().map(|s| s.name.as_str()).collect();
    names.dedup();
    for name in names {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| name.strip_suffix(suf))
            .filter(|b| m.mentions(&format!("# TYPE {b} histogram")))
            .unwrap_or(name);
        assert!(
            m.mentions(&format!("# TYPE {base} ")) && m.mentions(&format!("# HELP {base} ")),
            "{name} has no TYPE/HELP"
        );
    }
    // Never on the public listener.
    let r = get(gw.public_addr, "/metrics").await;
    assert_eq!(r.status, 404, "{}", r.text());
}

#[tokio::test]
async fn series_count_stays_bounded_under_random_client_ids() {
    let dir = PolicyDir::new(&[("whoami.yaml", WHOAMI)]);
    let gw = dir.start().await;
    let addr = gw.public_addr;
    let ids = random_ids(1010);
    // Warm up: the `other` series of every family exists after a few requests.
    for id in &ids[..10] {
        assert_eq!(whoami(addr, id).await.status, 200);
    }
    let before = scrape(&gw).await;

    let mut tasks = Vec::new();
    for chunk in ids[10..].chunks(125) {
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for id in chunk {
                let r = whoami(addr, &id).await;
                assert_eq!(r.status, 200, "{}", r.text());
            }
        }));
    }
    for t in tasks {
        t.await.expect("request task");
    }

    let after = scrape(&gw).await;
    let series = |m: &Scrape| {
        m.samples
            .iter()
            .filter(|s| !s.name.starts_with("process_"))
            .count()
    };
    assert_eq!(
        series(&after),
        series(&before),
        "1,000 distinct client ids must not add series"
    );
    assert_eq!(
        after.get(
            "gateway_service_requests_total",
            &[
                ("service", "whoami"),
                ("client", "other"),
                ("outcome", "success")
            ]
        ),
        1010.0
    );
    assert_eq!(
        after.label_values("gateway_service_requests_total", "client"),
        vec!["other".to_owned()]
    );
    for id in ids.iter().step_by(97) {
        assert!(!after.mentions(id), "{id} appears in the scrape");
    }
    assert!(
        after.text.len() < 256 * 1024,
        "the scrape grew to {} bytes",
        after.text.len()
    );
}

/// Distinct random-looking ids (no dependency on a RNG crate: std's randomly keyed hasher).
fn random_ids(n: usize) -> Vec<String> {
    use std::hash::{BuildHasher, RandomState};
    let state = RandomState::new();
    (0..n)
        .map(|i| format!("app-{:016x}-{i}", state.hash_one(i)))
        .collect()
}

/// A policy's own `monitoring:` settings: `client_attribute` names the attribute that labels
/// the client, and `enabled: false` records nothing for the policy (nor its nodes).
const POLICY_SETTINGS: &str = r#"
policies:
  - name: custom-attr
    route: { path: /custom, methods: [GET] }
    monitoring: { client_attribute: app.caller }
    chain:
      - name: identify
        type: set_attribute
        attribute: app.caller
        value: "${http.header.x-client}"
      - name: answer
        type: set_response
        body: custom
  - name: silent
    route: { path: /silent, methods: [GET] }
    monitoring: { enabled: false }
    chain:
      - name: identify
        type: set_attribute
        attribute: authentication.subject.id
        value: "${http.header.x-client}"
      - name: quiet
        type: set_response
        body: silent
"#;

/// Starts the engine on `POLICY_SETTINGS` with one registered client and sends one request
/// with that client id to `path`.
async fn policy_settings_engine(path: &str) -> (PolicyDir, Gateway, String) {
    let (dir, gw, id, _) =
        start_with_client(&[("custom.yaml", POLICY_SETTINGS)], "client_credentials").await;
    let r = get_as(gw.public_addr, path, &id).await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    (dir, gw, id)
}

#[tokio::test]
async fn policy_client_attribute_labels_the_policy_service_context() {
    let (_dir, gw, id) = policy_settings_engine("/custom").await;
    let m = scrape(&gw).await;
    let svc = "gateway_service_requests_total";
    assert_eq!(
        m.value(
            svc,
            &[
                ("service", "custom-attr"),
                ("client", &id),
                ("outcome", "success")
            ]
        ),
        Some(1.0),
        "the policy's monitoring.client_attribute (app.caller) must label the client:\n{}",
        m.dump(svc)
    );
}

#[tokio::test]
async fn policy_monitoring_disabled_records_nothing_for_the_policy() {
    let (_dir, gw, _) = policy_settings_engine("/silent").await;
    let m = scrape(&gw).await;
    let svc = "gateway_service_requests_total";
    assert!(
        m.matching("gateway_node_requests_total", &[("policy", "silent")])
            .is_empty(),
        "nodes of a policy with monitoring.enabled: false are recorded:\n{}",
        m.dump("gateway_node_requests_total")
    );
    assert!(
        m.matching(svc, &[("service", "silent")]).is_empty(),
        "a policy with monitoring.enabled: false must record no service context:\n{}",
        m.dump(svc)
    );
}

/// A policy whose own context and a node's context name different client attributes: each is
/// labelled by its own (the engine resolves a client label once per attribute and request).
const APART: &str = r#"
policies:
  - name: labelled-apart
    service: apart
    route: { path: /apart-token, methods: [POST] }
    monitoring: { client_attribute: app.caller }
    chain:
      - name: caller
        type: set_attribute
        attribute: app.caller
        value: "${http.header.x-caller}"
      - name: grant
        type: client_credentials
        application_validation: { client_credentials_in: authorization_header }
        access_token: { store: tokens, expiry_secs: 3600, length: 54, type: Bearer }
        monitoring: { enabled: true, client_attribute: authentication.subject.id }
"#;

#[tokio::test]
async fn a_policy_and_a_node_context_are_labelled_by_their_own_client_attributes() {
    let (_dir, gw, id, secret) =
        start_with_client(&[("apart.yaml", APART)], "client_credentials").await;
    let r = post_form(
        gw.public_addr,
        "/apart-token",
        &[
            ("authorization", &basic(&id, &secret)),
            ("x-caller", "not-a-registered-id"),
        ],
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = scrape(&gw).await;
    let svc = "gateway_service_requests_total";
    let count = |service: &str, client: &str| {
        m.value(
            svc,
            &[
                ("service", service),
                ("client", client),
                ("outcome", "success"),
            ],
        )
    };
    assert_eq!(count("grant", &id), Some(1.0), "{}", m.dump(svc));
    assert_eq!(count("apart", "other"), Some(1.0), "{}", m.dump(svc));
    assert_eq!(count("apart", &id), None, "{}", m.dump(svc));
    gw.shutdown().await;
}
