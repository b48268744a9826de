//! The Grafana dashboard shipped in `monitoring/grafana/`, compiled in so tests can read it.

/// `monitoring/grafana/gateway-dashboard.json`.
pub const DASHBOARD_JSON: &str = include_str!("../grafana/gateway-dashboard.json");
/// The dashboard's stable uid (links and provisioning depend on it).
pub const DASHBOARD_UID: &str = "gateway-service-usage";

/// Every PromQL `expr` of the dashboard, in panel order. They use no Grafana variables, so
/// each can be sent as is to Prometheus's `/api/v1/query`.
pub fn dashboard_queries() -> Vec<String> {
    let json: serde_json::Value = serde_json::from_str(DASHBOARD_JSON)
        .expect("the shipped dashboard JSON parses (unit-tested)");
    let mut out = Vec::new();
    collect_exprs(&json, &mut out);
    out
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}
