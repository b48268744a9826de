//! `bench`: the gateway's benchmark harness (issue 6). One command runs every case beside a bare
//! hyper server from this workspace and writes `BENCHMARKS.md`:
//!
//! ```sh
//! cargo run --release -p bench            # full: 3 repetitions, 2 s warm-up + 5 s per run
//! cargo run --release -p bench -- --quick # smoke: 1 repetition, 1 s + 2 s, small memory test
//! ```
//!
//! It builds the `gateway` binary into its own target dir first, then runs each repetition in
//! groups, each a `ceiling` run and the cases divided by it: `chain`; `chain-metrics-off`;
//! `refresh-memory`; `metrics-off, metrics-on`; `sqlite-ref, refresh-sqlite`;
//! `refresh-postgres`. Each group runs in both placements (pinned: server on CPU 0 with one
//! worker, generator on CPU 1; unpinned: two of each), the second backwards, and every case is
//! reported as a ratio to the run of its reference next to it. Each repetition ends with the
//! pairs measured side by side (both servers on CPU 0 at once, each pair both ways, and a
//! control of one case beside itself), from which the metrics-cost and `chain` targets are
//! judged.
//!
//! Subcommands are the pieces it runs in their own processes (and that you can run alone):
//! `one CASE` (one run, JSON; `--perf FILE` records the server with `perf`), `side A B` (two
//! servers at once on one core, the side-by-side measurement of the metrics cost), `loadgen`,
//! `sqlite-ref`, `mem-tokens`, `evict`.

#![forbid(unsafe_code)]

mod cases;
mod harness;
mod hostprobe;
mod loadgen;
mod procfs;
mod storebench;

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};

use cases::{Bins, Case, Placement, RunOptions, Timing};
use harness::secs;
use loadgen::SECRETS_ENV;

const USAGE: &str = "\
usage:
  bench [--quick] [--reps N] [--warmup SECS] [--secs SECS] [--conns N] [--cases a,b,...]
        [--pinned-only] [--mem-pairs N] [--out FILE] [--no-build]
  bench one CASE [--unpinned] [--warmup SECS] [--secs SECS] [--conns N] [--perf FILE] [--no-build]
  bench side CASE_A CASE_B [--warmup SECS] [--secs SECS] [--conns N] [--no-build]
                (both servers at once on CPU 0, one generator on CPU 1; JSON of each, then B ÷ A)
  bench loadgen --addr ADDR [--conns N] [--threads N] [--warmup SECS] [--secs SECS]
                (--path PATH | --client-id ID, its secret in BENCH_CLIENT_SECRETS)
                (--addr and --client-id repeated: several targets, connections shared out
                in turn, one RESULT line each; BENCH_CLIENT_SECRETS then holds one secret
                per line, in the same order. Secrets stay off the command line, which
                every user of the machine can read)
  bench sqlite-ref --url URL [--tasks N] [--warmup SECS] [--secs SECS]
  bench probe   (the round trip of one cache line between CPU 0 and CPU 1, ns: where the
                hypervisor has put the two vCPUs; the harness runs it around every run)
  bench mem-tokens --kind memory|hashmap|moka [--pairs N]
                (memory: also the median times of a family revocation and of the purge pass
                that sweeps it, beside a pass with nothing to sweep)
  bench evict [--max-tokens N]
                (the memory store's rotations alone, ns each: filling to half, to full, then
                twice full, where every write evicts, and the resident memory after each;
                run it pinned: taskset -c 0)

cases: ceiling chain chain-metrics-off refresh-memory metrics-off metrics-on sqlite-ref refresh-sqlite
       refresh-postgres (PostgreSQL: TEST_DATABASE_URL, default
       postgres://postgres@127.0.0.1:5432/test, a fresh schema per run)";

/// A tiny flag parser: `--name value` pairs and bare `--switch`es.
struct Args {
    positional: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

const SWITCHES: &[&str] = &[
    "--quick",
    "--unpinned",
    "--pinned-only",
    "--no-build",
    "--help",
];

impl Args {
    fn parse(raw: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let mut positional = Vec::new();
        let mut flags = Vec::new();
        let mut raw = raw.peekable();
        while let Some(a) = raw.next() {
            if a == "-h" || SWITCHES.contains(&a.as_str()) {
                flags.push((a, None));
            } else if a.starts_with("--") {
                let v = raw.next().with_context(|| format!("{a} needs a value"))?;
                flags.push((a, Some(v)));
            } else {
                positional.push(a);
            }
        }
        Ok(Args { positional, flags })
    }
    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }
    /// Every value of a flag that may be repeated, in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.flags
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }
    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}: not a number: {v:?}")),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse(std::env::args().skip(1))?;
    if args.has("--help") || args.has("-h") {
        println!("{USAGE}");
        return Ok(());
    }
    match args.positional.first().map(String::as_str) {
        None | Some("run") => run_all(&args),
        Some("one") => one(&args),
        Some("side") => side(&args),
        Some("loadgen") => loadgen_cmd(&args),
        Some("sqlite-ref") => sqlite_ref(&args),
        Some("mem-tokens") => mem_tokens(&args),
        Some("evict") => {
            let max_tokens: u64 = args.num("--max-tokens", 1_000_000)?;
            let storebench::AtCap {
                ns,
                tail_ns: tail,
                evictions,
                rss_kb: rss,
            } = storebench::rotations_at_cap(max_tokens)?;
            let mb = |kb: u64| (kb as f64 / 1024.0 * 10.0).round() / 10.0;
            println!(
                "{}",
                serde_json::json!({
                    "max_tokens": max_tokens,
                    "ns_per_rotation": { "to_half": ns[0], "to_full": ns[1], "full": ns[2], "full_again": ns[3] },
                    "full_p999_ns": tail[0],
                    "full_max_ns": tail[1],
                    "evictions": evictions,
                    "rss_mb": { "to_half": mb(rss[0]), "to_full": mb(rss[1]), "full": mb(rss[2]), "full_again": mb(rss[3]) },
                })
            );
            Ok(())
        }
        Some("probe") => {
            let ns = hostprobe::round_trip_ns()?;
            println!("{}", serde_json::json!({ "cpu0_cpu1_round_trip_ns": ns }));
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn run_all(args: &Args) -> anyhow::Result<()> {
    let quick = args.has("--quick");
    let bins = Bins::beside_current_exe()?;
    let commit = harness::workspace_commit();
    if !args.has("--no-build") {
        harness::build_gateway(&bins)?;
    }
    let cases = match args.get("--cases") {
        None => Case::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|c| Case::parse(c.trim()).with_context(|| format!("unknown case {c:?}")))
            .collect::<anyhow::Result<_>>()?,
    };
    let out = match args.get("--out") {
        Some(p) => PathBuf::from(p),
        None if quick => bins
            .bench
            .parent()
            .context("exe dir")?
            .join("BENCHMARKS-quick.md"),
        None => harness::default_out(),
    };
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let command = if raw.is_empty() {
        "cargo run --release -p bench".to_owned()
    } else {
        format!("cargo run --release -p bench -- {}", raw.join(" "))
    };
    let plan = harness::Plan {
        reps: args.num("--reps", if quick { 1 } else { 3 })?,
        timing: Timing {
            warmup: secs(args.num("--warmup", if quick { 1.0 } else { 2.0 })?),
            duration: secs(args.num("--secs", if quick { 2.0 } else { 5.0 })?),
            conns: args.num("--conns", 64)?,
        },
        cases,
        placements: if args.has("--pinned-only") {
            vec![Placement::Pinned]
        } else {
            vec![Placement::Pinned, Placement::Unpinned]
        },
        mem_pairs: args.num("--mem-pairs", if quick { 50_000 } else { 500_000 })?,
        pg_url: cases::default_pg_url(),
        out: out.clone(),
        command,
        quick,
        commit,
    };
    let md = harness::run(&bins, &plan)?;
    println!("{md}");
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn one(args: &Args) -> anyhow::Result<()> {
    let name = args.positional.get(1).context("bench one CASE")?;
    let case = Case::parse(name).with_context(|| format!("unknown case {name:?}\n{USAGE}"))?;
    let bins = Bins::beside_current_exe()?;
    if case.needs_gateway() && !args.has("--no-build") {
        harness::build_gateway(&bins)?;
    }
    let placement = if args.has("--unpinned") {
        Placement::Unpinned
    } else {
        Placement::Pinned
    };
    let timing = short_timing(args)?;
    let opts = RunOptions {
        perf: args.get("--perf").map(PathBuf::from),
    };
    let m = cases::run_case(
        &bins,
        case,
        placement,
        &timing,
        &cases::default_pg_url(),
        &opts,
    )?;
    println!("{}", harness::measured_json(&m));
    Ok(())
}

/// The timing of `one` and `side`: 1 s warm-up and 3 s measured unless told.
fn short_timing(args: &Args) -> anyhow::Result<Timing> {
    Ok(Timing {
        warmup: secs(args.num("--warmup", 1.0)?),
        duration: secs(args.num("--secs", 3.0)?),
        conns: args.num("--conns", 64)?,
    })
}

fn side(args: &Args) -> anyhow::Result<()> {
    let case = |i: usize| -> anyhow::Result<Case> {
        let name = args.positional.get(i).context("bench side CASE_A CASE_B")?;
        Case::parse(name).with_context(|| format!("unknown case {name:?}\n{USAGE}"))
    };
    let cases = [case(1)?, case(2)?];
    let bins = Bins::beside_current_exe()?;
    if cases.iter().any(|c| c.needs_gateway()) && !args.has("--no-build") {
        harness::build_gateway(&bins)?;
    }
    let timing = short_timing(args)?;
    let [a, b] = cases::run_side_by_side(&bins, cases, &timing, &cases::default_pg_url())?;
    println!("{}", harness::measured_json(&a));
    println!("{}", harness::measured_json(&b));
    println!(
        "{}",
        serde_json::json!({
            "rps_b_over_a": b.outcome.rps() / a.outcome.rps(),
            "cpu_per_req_b_over_a": b.server_cpu_us_per_req / a.server_cpu_us_per_req,
        })
    );
    Ok(())
}

/// Prints `START`, `STOP` and `RESULT {json}` lines for the harness.
fn phase_printer(phase: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{phase}");
    let _ = out.flush();
}

fn loadgen_cmd(args: &Args) -> anyhow::Result<()> {
    let addrs = args
        .all("--addr")
        .into_iter()
        .map(|a| {
            a.parse::<SocketAddr>()
                .with_context(|| format!("--addr {a}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if addrs.is_empty() {
        bail!("--addr is needed (once per target)");
    }
    if args.get("--secret").is_some() {
        bail!(
            "--secret is not taken: a command line is readable by every user of the machine; \
             put the secret in {SECRETS_ENV}"
        );
    }
    let ids = args.all("--client-id");
    let secrets = std::env::var(SECRETS_ENV).unwrap_or_default();
    let secrets: Vec<&str> = secrets.lines().collect();
    let refresh = !ids.is_empty();
    if refresh && (ids.len() != addrs.len() || secrets.len() != addrs.len()) {
        bail!(
            "refresh mode needs one --client-id per --addr and as many lines in {SECRETS_ENV}, in the same order"
        );
    }
    let targets = addrs
        .iter()
        .enumerate()
        .map(|(i, &addr)| loadgen::Target {
            addr,
            mode: if refresh {
                loadgen::Mode::Refresh {
                    client_id: ids[i].to_owned(),
                    secret: secrets[i].to_owned(),
                }
            } else {
                loadgen::Mode::Get {
                    path: args.get("--path").unwrap_or("/").to_owned(),
                }
            },
        })
        .collect();
    let spec = loadgen::Spec {
        targets,
        conns: args.num("--conns", 64)?,
        threads: args.num("--threads", 1)?,
        warmup: secs(args.num("--warmup", 1.0)?),
        duration: secs(args.num("--secs", 3.0)?),
    };
    // One RESULT line per target, in the order of the --addr flags.
    for outcome in loadgen::run(&spec, phase_printer)? {
        println!("RESULT {}", outcome.to_json());
    }
    Ok(())
}

fn sqlite_ref(args: &Args) -> anyhow::Result<()> {
    let url = args.get("--url").context("--url sqlite://PATH")?.to_owned();
    let tasks: usize = args.num("--tasks", 64)?;
    let warmup = secs(args.num("--warmup", 1.0)?);
    let duration = secs(args.num("--secs", 3.0)?);
    let workers = std::env::var("GATEWAY_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    let run = rt.block_on(async move {
        let store = store::sql::SqlStore::connect(&store::config::SqlConfig::new(url)).await?;
        let store: Arc<dyn store::TokenStore> = Arc::new(store);
        storebench::rotate_loop(store, tasks, warmup, duration, phase_printer).await
    })?;
    let outcome = loadgen::Outcome {
        requests: run.rotations,
        non_2xx: run.failures,
        io_errors: 0,
        elapsed_secs: run.elapsed_secs,
        p50_us: run.p50_us,
        p99_us: run.p99_us,
        max_us: 0.0,
    };
    println!("RESULT {}", outcome.to_json());
    std::io::stdout().flush()?;
    // Stay alive (and measurable) until the harness has read our peak RSS.
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    Ok(())
}

fn mem_tokens(args: &Args) -> anyhow::Result<()> {
    let kind = args.get("--kind").unwrap_or("memory").to_owned();
    let pairs: usize = args.num("--pairs", 500_000)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (entries, bytes, times) = rt.block_on(storebench::memory_per_token(&kind, pairs))?;
    println!(
        "{}",
        serde_json::json!({
            "kind": kind,
            "entries": entries,
            "rss_delta_bytes": bytes,
            "bytes_per_entry": bytes as f64 / entries.max(1) as f64,
            "revoke_family_us": times.as_ref().and_then(|t| t.revoke_family_us),
            "purge_pass_ms": times.as_ref().and_then(|t| t.purge_pass_ms),
            "purge_pass_sweeping_ms": times.as_ref().and_then(|t| t.purge_pass_sweeping_ms),
        })
    );
    Ok(())
}
