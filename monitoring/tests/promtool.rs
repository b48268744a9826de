//! Checks with Prometheus's own tooling (`promtool`, Debian package `prometheus`; `.ci/run`
//! installs it). These tests fail, loudly, when promtool is missing: they never pass silently.
//!
//! - `promtool check metrics` accepts a scrape (no lint complaints);
//! - `promtool check config` accepts `grafana/prometheus.yml`;
//! - every PromQL expression of the Grafana dashboard parses, and returns data when evaluated by
//!   `promtool test rules` over series taken from two real scrapes (each expression `E` becomes
//!   an alert `absent(E)` that must not fire).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use monitoring::{Monitoring, Outcome, dashboard_queries};

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool not found on PATH: install Debian's `prometheus` package \
             (`apt-get install -y prometheus`); these checks must not be skipped"
        )
    })
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(promtool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    {
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).expect("write to promtool");
        }
    }
    child.wait_with_output().expect("promtool output")
}

fn assert_ok(what: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// One request of each kind, as a gateway serving traffic records them.
fn exercise(m: &Monitoring) {
    let ms = Duration::from_millis(2);
    let client = m.client(Some("app-1"));
    let service = m.service("token-endpoint");
    service.record(client, Outcome::Success, ms);
    service.record(m.client(Some("unregistered")), Outcome::Failure, ms);
    service.record(m.client(None), Outcome::Exception, ms);
    let mut scope = m.composite("serviceA+B").scope(client);
    scope.record_service(&m.service("serviceA"), Outcome::Success, ms);
    scope.record_service(&m.service("serviceB"), Outcome::Failure, ms);
    let _ = scope.finish();
    m.node("token-endpoint", "refresh")
        .record(Outcome::Success, ms);
    m.token_issued("refresh_token");
    m.refresh_outcome("ok");
    m.refresh_outcome("invalid_grant");
    let store = m.store("tokens");
    store.set_live(10);
    store.purged(1);
    store.op("rotate", Duration::from_micros(30));
    m.reload(true);
}

fn monitoring() -> Monitoring {
    let m = Monitoring::new();
    m.set_known_clients(vec!["app-1".into()]);
    m
}

#[test]
fn promtool_check_metrics_accepts_a_scrape() {
    let m = monitoring();
    exercise(&m);
    let _in_flight = m.in_flight();
    let scrape = m.render();
    let out = run(&["check", "metrics"], Some(&scrape));
    assert_ok("promtool check metrics", &out);
    // promtool prints lint problems even on some successful runs: there must be none.
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        complaints.trim().is_empty(),
        "promtool complaints:\n{complaints}"
    );
}

#[test]
fn promtool_check_config_accepts_the_scrape_config() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/prometheus.yml");
    let out = run(
        &["check", "config", config.to_str().expect("utf-8 path")],
        None,
    );
    assert_ok("promtool check config", &out);
}

/// `name{labels} value` lines of a scrape.
fn samples(scrape: &str) -> Vec<(String, String)> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.to_owned()))
        })
        .collect()
}

fn yaml_single_quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[test]
fn every_dashboard_query_parses_and_returns_data() {
    let queries = dashboard_queries();
    assert!(!queries.is_empty());

    let m = monitoring();
    exercise(&m);
    let first: std::collections::HashMap<String, String> =
        samples(&m.render()).into_iter().collect();
    for _ in 0..5 {
        exercise(&m);
    }
    let second = samples(&m.render());

    let dir = tempfile::tempdir().expect("tempdir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - alert: DashboardQuery{i}\n        expr: {}\n",
            yaml_single_quoted(&format!("absent({q})"))
        ));
    }
    std::fs::write(dir.path().join("rules.yml"), &rules).expect("write rules");
    let out = run(
        &[
            "check",
            "rules",
            dir.path().join("rules.yml").to_str().expect("utf-8"),
        ],
        None,
    );
    assert_ok("promtool check rules (dashboard PromQL)", &out);

    // Six samples a minute apart: the first scrape's values, then the second's.
    let mut test = String::from(
        "rule_files:\n  - rules.yml\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n",
    );
    for (series, v2) in &second {
        let v1 = first.get(series).map_or("0", String::as_str);
        test.push_str(&format!(
            "      - series: {}\n        values: '{v1} {v1} {v1} {v2} {v2} {v2}'\n",
            yaml_single_quoted(series)
        ));
    }
    test.push_str("    alert_rule_test:\n");
    for i in 0..queries.len() {
        test.push_str(&format!(
            "      - eval_time: 5m\n        alertname: DashboardQuery{i}\n        exp_alerts: []\n"
        ));
    }
    std::fs::write(dir.path().join("test.yml"), &test).expect("write test");
    let out = run(
        &[
            "test",
            "rules",
            dir.path().join("test.yml").to_str().expect("utf-8"),
        ],
        None,
    );
    let listing: String = queries
        .iter()
        .enumerate()
        .map(|(i, q)| format!("DashboardQuery{i}: {q}\n"))
        .collect();
    assert!(
        out.status.success(),
        "a dashboard query returned no data (its absent() alert fired):\n{}\n{}\n{listing}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
