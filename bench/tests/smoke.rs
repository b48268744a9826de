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

/// The load generator takes client secrets from its environment, one per `--client-id`, never
/// from its command line (which every user of the machine can read).
#[test]
fn the_load_generator_reads_client_secrets_from_its_environment_only() {
    // A port nothing listens on: with its secret the generator gets as far as connecting.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let loadgen = |secrets: Option<&str>, extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bench"));
        cmd.args([
            "loadgen",
            "--addr",
            &closed.to_string(),
            "--client-id",
            "app",
        ])
        .args(["--warmup", "0", "--secs", "0.2", "--conns", "1"])
        .args(extra)
        .env_remove("BENCH_CLIENT_SECRETS");
        if let Some(s) = secrets {
            cmd.env("BENCH_CLIENT_SECRETS", s);
        }
        let out = cmd.output().expect("run bench loadgen");
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.success(), said)
    };

    let (ok, said) = loadgen(None, &[]);
    assert!(!ok && said.contains("BENCH_CLIENT_SECRETS"), "{said}");
    // The old flag is refused by name, its value not repeated.
    let (ok, said) = loadgen(Some("s3cr3t"), &["--secret", "s3cr3t"]);
    assert!(!ok && said.contains("--secret"), "{said}");
    assert!(!said.contains("s3cr3t"), "{said}");
    // With its secret in the environment it runs: every connection attempt fails (I/O errors),
    // none of it for want of a secret.
    let (_, said) = loadgen(Some("s3cr3t\n"), &[]);
    assert!(said.contains("io_errors"), "{said}");
    assert!(!said.contains("BENCH_CLIENT_SECRETS"), "{said}");
    assert!(!said.contains("s3cr3t"), "{said}");
}
