use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};

use super::*;

const MS: Duration = Duration::from_millis(1);

fn token() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 54)
}

/// The sample lines of one metric (exact name, so `_total` does not match `_total_x`).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

fn value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().expect("numeric sample"))
}

/// Records one of each kind, as a gateway that served traffic would have.
fn exercised() -> Monitoring {
    let m = Monitoring::new();
    m.set_known_clients(vec!["app-1".into(), "app-2".into()]);
    m.record_service("token-endpoint", "app-1", Outcome::Success, MS);
    m.record_service("token-endpoint", "app-2", Outcome::Failure, 3 * MS);
    m.record_service("token-endpoint", "", Outcome::Exception, MS);
    let mut scope = m.composite_scope("serviceA+B", Some("app-1"));
    scope.record_service(&m.service("serviceA"), Outcome::Success, MS);
    scope.record_service(&m.service("serviceB"), Outcome::Success, MS);
    let _ = scope.finish();
    m.record_node("token-endpoint", "refresh", Outcome::Success, MS);
    m.token_issued("refresh_token");
    m.refresh_outcome("ok");
    m.refresh_outcome("invalid_grant");
    m.store_live("tokens", 42);
    m.store_purged("tokens", 3);
    m.store_op("tokens", "rotate", Duration::from_micros(20));
    // The gauges' series exist (at 0) from the start; the guards move them.
    drop(m.in_flight());
    drop(m.connection());
    m.reload(true);
    m
}

#[test]
fn render_contains_every_series_after_recording() {
    let m = exercised();
    let (_in_flight, _open) = (m.in_flight(), m.connection());
    let text = m.render();
    let v = |name, labels| value(&text, name, labels);
    assert_eq!(
        v(
            "gateway_service_requests_total",
            r#"client="app-1",outcome="success",service="token-endpoint""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "gateway_service_requests_total",
            r#"client="app-2",outcome="failure",service="token-endpoint""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "gateway_service_requests_total",
            r#"client="anonymous",outcome="exception",service="token-endpoint""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "gateway_service_request_duration_seconds_count",
            r#"client="app-2",outcome="failure",service="token-endpoint""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "gateway_service_request_duration_seconds_bucket",
            r#"client="app-2",outcome="failure",service="token-endpoint",le="0.0025""#
        ),
        Some(0.0)
    );
    assert_eq!(
        v(
            "gateway_service_request_duration_seconds_bucket",
            r#"client="app-2",outcome="failure",service="token-endpoint",le="0.005""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "gateway_composite_requests_total",
            r#"client="app-1",composite="serviceA+B",outcome="success""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "gateway_service_requests_total",
            r#"client="app-1",outcome="success",service="serviceB""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "gateway_node_requests_total",
            r#"node="refresh",outcome="success",policy="token-endpoint""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "gateway_node_duration_seconds_count",
            r#"node="refresh",outcome="success",policy="token-endpoint""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "gateway_tokens_issued_total",
            r#"grant_type="refresh_token""#
        ),
        Some(1.0)
    );
    assert_eq!(
        v("gateway_tokens_issued_total", r#"grant_type="other""#),
        Some(0.0)
    );
    assert_eq!(v("gateway_refresh_total", r#"outcome="ok""#), Some(1.0));
    assert_eq!(
        v("gateway_refresh_total", r#"outcome="invalid_grant""#),
        Some(1.0)
    );
    assert_eq!(
        v("gateway_refresh_total", r#"outcome="reuse_detected""#),
        Some(0.0)
    );
    assert_eq!(
        v("gateway_store_live_tokens", r#"store="tokens""#),
        Some(42.0)
    );
    assert_eq!(
        v("gateway_store_purged_tokens_total", r#"store="tokens""#),
        Some(3.0)
    );
    assert_eq!(
        v(
            "gateway_store_operation_duration_seconds_count",
            r#"op="rotate",store="tokens""#
        ),
        Some(1.0)
    );
    assert!(text.contains("\ngateway_requests_in_flight 1\n"), "{text}");
    assert!(text.contains("\ngateway_connections_open 1\n"));
    assert_eq!(
        v("gateway_policy_reloads_total", r#"result="ok""#),
        Some(1.0)
    );
    assert_eq!(
        v("gateway_policy_reloads_total", r#"result="error""#),
        Some(0.0)
    );
    assert_eq!(
        v(
            "gateway_build_info",
            &format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))
        ),
        Some(1.0)
    );
    #[cfg(target_os = "linux")]
    assert!(!samples(&text, "process_resident_memory_bytes").is_empty());
}

#[test]
fn every_refresh_outcome_and_grant_type_is_exported_from_the_start() {
    let text = Monitoring::new().render();
    for o in RefreshOutcome::ALL {
        let labels = format!(r#"outcome="{}""#, o.as_str());
        assert_eq!(
            value(&text, "gateway_refresh_total", &labels),
            Some(0.0),
            "{labels}"
        );
    }
    assert_eq!(
        samples(&text, "gateway_tokens_issued_total").len(),
        GRANT_TYPES.len()
    );
    assert_eq!(samples(&text, "gateway_refresh_total").len(), 10);
}

#[test]
fn outcomes_are_labelled_and_unknown_refresh_outcomes_are_errors() {
    let m = Monitoring::new();
    let node = m.node("p", "n");
    for o in Outcome::ALL {
        node.record(o, MS);
    }
    node.record(Outcome::Failure, MS);
    m.refresh_outcome("definitely-not-an-outcome");
    let text = m.render();
    let node_count = |o: &str| {
        value(
            &text,
            "gateway_node_requests_total",
            &format!(r#"node="n",outcome="{o}",policy="p""#),
        )
    };
    assert_eq!(node_count("success"), Some(1.0));
    assert_eq!(node_count("failure"), Some(2.0));
    assert_eq!(node_count("exception"), Some(1.0));
    assert_eq!(
        value(&text, "gateway_refresh_total", r#"outcome="error""#),
        Some(1.0)
    );
    assert!(!text.contains("definitely-not-an-outcome"));
    assert_eq!(Outcome::Success.worst(Outcome::Failure), Outcome::Failure);
    assert_eq!(
        Outcome::Exception.worst(Outcome::Failure),
        Outcome::Exception
    );
}

#[test]
fn unregistered_clients_and_tokens_never_become_labels() {
    let m = Monitoring::new();
    m.set_known_clients(vec!["app-1".into()]);
    let service = m.service("svc");
    let mut secrets = Vec::new();
    for _ in 0..10_000 {
        let t = token();
        service.record(m.client(Some(&t)), Outcome::Success, MS);
        m.record_service("svc", &t, Outcome::Failure, MS);
        m.token_issued(&t);
        m.refresh_outcome(&t);
        secrets.push(t);
    }
    service.record(m.client(Some("app-1")), Outcome::Success, MS);
    service.record(m.client(None), Outcome::Success, MS);
    let text = m.render();
    for t in &secrets {
        assert!(!text.contains(t.as_str()), "a random id became a label");
    }
    assert_eq!(
        value(
            &text,
            "gateway_service_requests_total",
            r#"client="other",outcome="success",service="svc""#
        ),
        Some(10_000.0)
    );
    assert_eq!(
        value(
            &text,
            "gateway_service_requests_total",
            r#"client="other",outcome="failure",service="svc""#
        ),
        Some(10_000.0)
    );
    // anonymous, other, app-1: three outcomes each.
    assert_eq!(samples(&text, "gateway_service_requests_total").len(), 9);
    assert_eq!(
        value(
            &text,
            "gateway_tokens_issued_total",
            r#"grant_type="other""#
        ),
        Some(10_000.0)
    );
    assert_eq!(
        value(&text, "gateway_refresh_total", r#"outcome="error""#),
        Some(10_000.0)
    );
}

#[test]
fn registered_clients_are_capped() {
    let m = Monitoring::with_config(MonitoringConfig {
        max_client_labels: 1000,
        process_metrics: false,
    });
    let ids: Vec<String> = (0..10_000).map(|i| format!("client-{i}")).collect();
    m.set_known_clients(ids.clone());
    let service = m.service("svc");
    for id in &ids {
        service.record(m.client(Some(id)), Outcome::Success, MS);
    }
    let text = m.render();
    let series = samples(&text, "gateway_service_requests_total");
    // 1000 registered ids + anonymous + other, three outcomes each.
    assert_eq!(series.len(), 1002 * 3);
    assert_eq!(
        value(
            &text,
            "gateway_service_requests_total",
            r#"client="other",outcome="success",service="svc""#
        ),
        Some(9_000.0)
    );
    assert!(text.contains(r#"client="client-999""#));
    assert!(!text.contains(r#"client="client-1000""#));
}

#[test]
fn reload_of_known_clients_keeps_slots_and_demotes_removed_ids() {
    let m = Monitoring::new();
    m.set_known_clients(vec!["a".into(), "b".into()]);
    let a = m.client(Some("a"));
    m.set_known_clients(vec!["b".into()]);
    assert_eq!(m.client(Some("a")), ClientLabel::OTHER);
    m.set_known_clients(vec!["a".into()]);
    assert_eq!(m.client(Some("a")), a);
    assert_eq!(m.client(Some("")), ClientLabel::ANONYMOUS);
}

#[test]
fn composite_succeeds_only_if_every_service_succeeds() {
    let m = Monitoring::new();
    m.set_known_clients(vec!["app".into()]);
    let (a, b) = (m.service("serviceA"), m.service("serviceB"));
    let composite = m.composite("both");
    let client = m.client(Some("app"));

    let run = |oa: Outcome, ob: Outcome| {
        let mut scope = composite.scope(client);
        scope.record_service(&a, oa, MS);
        scope.record_service(&b, ob, MS);
        assert_eq!(scope.services(), 2);
        scope.finish()
    };
    assert_eq!(run(Outcome::Success, Outcome::Failure), Outcome::Failure);
    assert_eq!(run(Outcome::Success, Outcome::Success), Outcome::Success);
    assert_eq!(
        run(Outcome::Exception, Outcome::Failure),
        Outcome::Exception
    );
    assert_eq!(run(Outcome::Failure, Outcome::Success), Outcome::Failure);

    // No service ran: nothing failed.
    assert_eq!(composite.scope(client).finish(), Outcome::Success);
    // Dropped without finish (request cancelled): records nothing.
    let mut dropped = composite.scope(client);
    dropped.observe(Outcome::Failure);
    drop(dropped);

    let text = m.render();
    let count = |o: &str| {
        value(
            &text,
            "gateway_composite_requests_total",
            &format!(r#"client="app",composite="both",outcome="{o}""#),
        )
    };
    assert_eq!(count("success"), Some(2.0));
    assert_eq!(count("failure"), Some(2.0));
    assert_eq!(count("exception"), Some(1.0));
    assert_eq!(
        value(
            &text,
            "gateway_composite_request_duration_seconds_count",
            r#"client="app",composite="both",outcome="failure""#
        ),
        Some(2.0)
    );
    // The services are still monitored separately.
    let svc = |s: &str, o: &str| {
        value(
            &text,
            "gateway_service_requests_total",
            &format!(r#"client="app",outcome="{o}",service="{s}""#),
        )
    };
    assert_eq!(svc("serviceA", "success"), Some(2.0));
    assert_eq!(svc("serviceB", "failure"), Some(2.0));
}

#[test]
fn two_instances_share_nothing() {
    let one = Monitoring::new();
    let two = Monitoring::new();
    one.set_known_clients(vec!["app".into()]);
    one.record_service("svc", "app", Outcome::Success, MS);
    one.token_issued("refresh_token");
    one.reload(false);
    let _guard = one.in_flight();
    let text = two.render();
    assert!(samples(&text, "gateway_service_requests_total").is_empty());
    assert_eq!(
        value(
            &text,
            "gateway_tokens_issued_total",
            r#"grant_type="refresh_token""#
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "gateway_policy_reloads_total", r#"result="error""#),
        Some(0.0)
    );
    assert!(text.contains("\ngateway_requests_in_flight 0\n"));
    // `app` is only known to `one`.
    assert_eq!(two.client(Some("app")), ClientLabel::OTHER);
    // Nothing in the global default registry either.
    assert!(
        prometheus::gather()
            .iter()
            .all(|f| !f.name().starts_with("gateway_"))
    );
}

#[test]
fn gauges_follow_guards() {
    let m = Monitoring::new();
    {
        let _r = m.in_flight();
        let _c = m.connection();
        let text = m.render();
        assert!(text.contains("\ngateway_requests_in_flight 1\n"));
        assert!(text.contains("\ngateway_connections_open 1\n"));
    }
    let text = m.render();
    assert!(text.contains("\ngateway_requests_in_flight 0\n"));
    assert!(text.contains("\ngateway_connections_open 0\n"));
}

#[test]
fn store_handles_exist_before_their_first_purge_and_ops_are_capped() {
    let m = Monitoring::new();
    let store = m.store("tokens");
    assert_eq!(store.name(), "tokens");
    let text = m.render();
    assert_eq!(
        value(&text, "gateway_store_live_tokens", r#"store="tokens""#),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            "gateway_store_purged_tokens_total",
            r#"store="tokens""#
        ),
        Some(0.0)
    );
    store.set_live(u64::MAX);
    for i in 0..100 {
        store.op(&format!("op{i}"), MS);
    }
    store.op_handle("get").record(MS);
    let text = m.render();
    assert_eq!(
        value(&text, "gateway_store_live_tokens", r#"store="tokens""#),
        Some(i64::MAX as f64)
    );
    let ops = samples(&text, "gateway_store_operation_duration_seconds_count");
    assert_eq!(ops.len(), MAX_STORE_OPS + 1);
    assert_eq!(
        value(
            &text,
            "gateway_store_operation_duration_seconds_count",
            r#"op="other",store="tokens""#
        ),
        Some(100.0 - MAX_STORE_OPS as f64 + 1.0)
    );
}

#[test]
fn handles_are_shared_by_name() {
    let m = Monitoring::new();
    let a = m.service("svc");
    a.record(ClientLabel::ANONYMOUS, Outcome::Success, MS);
    m.record_service("svc", "", Outcome::Success, MS);
    m.record_service("svc", "anonymous", Outcome::Success, MS);
    m.node("p", "n").record(Outcome::Success, MS);
    m.record_node("p", "n", Outcome::Success, MS);
    assert_eq!(a.name(), "svc");
    let text = m.render();
    assert_eq!(
        value(
            &text,
            "gateway_service_requests_total",
            r#"client="anonymous",outcome="success",service="svc""#
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &text,
            "gateway_node_requests_total",
            r#"node="n",outcome="success",policy="p""#
        ),
        Some(2.0)
    );
}

/// Metric names referenced by a PromQL expression (ours and the process collector's).
fn referenced_metrics(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("gateway_") || t.starts_with("process_"))
        .collect()
}

#[test]
fn dashboard_parses_has_a_stable_uid_and_only_queries_exported_metrics() {
    let json: serde_json::Value = serde_json::from_str(DASHBOARD_JSON).expect("dashboard JSON");
    assert_eq!(json["uid"], DASHBOARD_UID);
    assert_eq!(DASHBOARD_UID, "gateway-service-usage");

    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let text = exercised().render();
    for q in &queries {
        assert!(
            !q.contains('$'),
            "Grafana variable in {q}: not evaluable by Prometheus"
        );
        let names = referenced_metrics(q);
        assert!(!names.is_empty(), "no metric in {q}");
        for name in names {
            assert!(
                !samples(&text, name).is_empty(),
                "{q} references {name}, which render() does not export"
            );
        }
    }
    // The panels the issue asks for.
    let titles: Vec<&str> = json["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for wanted in [
        "Requests per second by service",
        "Error ratio by service",
        "Latency p50 / p99 by service",
        "Top clients",
        "Refresh outcomes",
        "Live tokens by store",
        "Policy reloads",
        "Requests in flight",
    ] {
        assert!(titles.contains(&wanted), "missing panel {wanted}");
    }
    // Every query panel uses the data source variable.
    for p in json["panels"].as_array().expect("panels") {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        }
    }
    let all = queries.join("\n");
    assert!(all.contains("histogram_quantile(0.5,"));
    assert!(all.contains("histogram_quantile(0.99,"));
}
