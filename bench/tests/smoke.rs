//! The harness itself works: one tiny `ceiling` run (0.5 s) through the same code path as the
//! benchmark (server process, load generator process, /proc samples) measures requests.
//! The benchmark proper never runs under `cargo test`.

use std::process::Command;

#[test]
fn one_short_ceiling_run_measures_requests() {
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "one",
            "ceiling",
            "--unpinned",
            "--warmup",
            "0.2",
            "--secs",
            "0.5",
            "--conns",
            "4",
            "--no-build",
        ])
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench one ceiling failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(v["case"], "ceiling");
    assert!(v["requests"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["non_2xx"], 0, "{v}");
    assert!(
        v["server_cpu_us_per_req"].as_f64().unwrap_or(0.0) > 0.0,
        "{v}"
    );
}

/// The side-by-side path: two servers at once, one generator sharing its connections between
/// them, each measured over the one window.
#[test]
fn one_short_side_by_side_run_measures_both_servers() {
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "side",
            "ceiling",
            "ceiling",
            "--warmup",
            "0.2",
            "--secs",
            "0.5",
            "--conns",
            "4",
            "--no-build",
        ])
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench side failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for v in &lines[..2] {
        assert_eq!(v["case"], "ceiling");
        assert!(v["requests"].as_u64().unwrap_or(0) > 0, "{v}");
        assert_eq!(v["non_2xx"], 0, "{v}");
        assert!(
            v["server_cpu_us_per_req"].as_f64().unwrap_or(0.0) > 0.0,
            "{v}"
        );
    }
    let ratio = lines[2]["rps_b_over_a"].as_f64().unwrap_or(0.0);
    assert!(ratio > 0.0 && ratio.is_finite(), "{}", lines[2]);
}
