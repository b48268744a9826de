//! Recording cost on the hot path. Ignored by default (timing is noisy on shared CI); run with
//! `cargo test --release -p monitoring --test cost -- --ignored --nocapture`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use monitoring::{Monitoring, Outcome};

fn per_call(n: u32, mut f: impl FnMut(u32)) -> Duration {
    for i in 0..n / 10 {
        f(i);
    }
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed() / n
}

#[test]
#[ignore]
fn recording_cost() {
    let m = Monitoring::new();
    m.set_known_clients((0..100).map(|i| format!("client-{i}")).collect());
    let ids: Vec<String> = (0..100).map(|i| format!("client-{i}")).collect();
    let service = m.service("token-endpoint");
    let node = m.node("token-endpoint", "refresh");
    let composite = m.composite("both");
    let d = Duration::from_micros(20);
    let n = 1_000_000;

    let handles = per_call(n, |i| {
        let client = m.client(Some(&ids[(i % 100) as usize]));
        let _g = m.in_flight();
        node.record(Outcome::Success, d);
        let mut scope = composite.scope(client);
        scope.record_service(&service, Outcome::Success, d);
        black_box(scope.finish());
        m.token_issued("refresh_token");
        m.refresh_outcome("ok");
    });
    let by_name = per_call(n, |i| {
        let _in_flight = m.in_flight();
        m.record_node("token-endpoint", "refresh", Outcome::Success, d);
        m.record_service(
            "token-endpoint",
            &ids[(i % 100) as usize],
            Outcome::Success,
            d,
        );
        m.token_issued("refresh_token");
        m.refresh_outcome("ok");
    });
    let node_only = per_call(n, |_| node.record(Outcome::Success, d));
    println!("per request, handles + composite scope: {handles:?}");
    println!("per request, by-name methods:           {by_name:?}");
    println!("one node record via handle:             {node_only:?}");
    // 3% of a 20 µs request.
    assert!(handles < Duration::from_nanos(600), "{handles:?}");
}

#[test]
#[ignore]
fn component_cost() {
    let m = Monitoring::new();
    m.set_known_clients((0..100).map(|i| format!("client-{i}")).collect());
    let ids: Vec<String> = (0..100).map(|i| format!("client-{i}")).collect();
    let service = m.service("token-endpoint");
    let d = Duration::from_micros(20);
    let n = 1_000_000;
    println!(
        "Instant::now:   {:?}",
        per_call(n, |_| {
            black_box(Instant::now());
        })
    );
    println!(
        "client resolve: {:?}",
        per_call(n, |i| {
            black_box(m.client(Some(&ids[(i % 100) as usize])));
        })
    );
    println!(
        "in_flight guard:{:?}",
        per_call(n, |_| {
            let _g = black_box(m.in_flight());
        })
    );
    println!(
        "service record: {:?}",
        per_call(n, |_| service.record(
            monitoring::ClientLabel::ANONYMOUS,
            Outcome::Success,
            d
        ))
    );
    println!(
        "token_issued:   {:?}",
        per_call(n, |_| m.token_issued("refresh_token"))
    );
    println!(
        "refresh ok:     {:?}",
        per_call(n, |_| m.refresh(monitoring::RefreshOutcome::Ok))
    );
    let h = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("x", "y")).unwrap();
    println!("bare observe:   {:?}", per_call(n, |_| h.observe(0.00002)));
    let c = prometheus::IntCounter::new("x", "y").unwrap();
    println!("bare inc:       {:?}", per_call(n, |_| c.inc()));
}
