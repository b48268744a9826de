//! The harness itself works: tiny runs (0.5 s) through the same code path as the benchmark
//! (server processes, load generator process, /proc samples) measure requests.
//! The benchmark proper never runs under `cargo test`.

use std::process::Command;

/// Runs `bench ARGS... --warmup 0.2 --secs 0.5 --conns 4 --no-build`; its stdout, one JSON
/// value a line, after checking that it succeeded.
fn short_run(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .args([
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
        "bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect()
}

/// A run of a `ceiling` server measured requests, all 2xx, and server CPU.
fn assert_measured(v: &serde_json::Value) {
    assert_eq!(v["case"], "ceiling");
    assert!(v["requests"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["non_2xx"], 0, "{v}");
    assert!(
        v["server_cpu_us_per_req"].as_f64().unwrap_or(0.0) > 0.0,
        "{v}"
    );
}

#[test]
fn one_short_ceiling_run_measures_requests() {
    let lines = short_run(&["one", "ceiling", "--unpinned"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_measured(&lines[0]);
}

/// The side-by-side path: two servers at once, one generator sharing its connections between
/// them, each measured over the one window.
#[test]
fn one_short_side_by_side_run_measures_both_servers() {
    let lines = short_run(&["side", "ceiling", "ceiling"]);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_measured(&lines[0]);
    assert_measured(&lines[1]);
    let ratio = lines[2]["rps_b_over_a"].as_f64().unwrap_or(0.0);
    assert!(ratio > 0.0 && ratio.is_finite(), "{}", lines[2]);
}
