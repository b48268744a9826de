//! One case, start to finish: a fresh server process (its own policy folder, store and client),
//! the load generator in another process, and the samples taken from `/proc` at the instants
//! the measured window opens and closes.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::loadgen::Outcome;
use crate::procfs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Case {
    Ceiling,
    Chain,
    ChainMetricsOff,
    RefreshMemory,
    MetricsOff,
    MetricsOn,
    SqliteRef,
    RefreshSqlite,
    RefreshPostgres,
}

impl Case {
    pub const ALL: [Case; 9] = [
        Case::Ceiling,
        Case::Chain,
        Case::ChainMetricsOff,
        Case::RefreshMemory,
        Case::MetricsOff,
        Case::MetricsOn,
        Case::SqliteRef,
        Case::RefreshSqlite,
        Case::RefreshPostgres,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Case::Ceiling => "ceiling",
            Case::Chain => "chain",
            Case::ChainMetricsOff => "chain-metrics-off",
            Case::RefreshMemory => "refresh-memory",
            Case::MetricsOff => "metrics-off",
            Case::MetricsOn => "metrics-on",
            Case::SqliteRef => "sqlite-ref",
            Case::RefreshSqlite => "refresh-sqlite",
            Case::RefreshPostgres => "refresh-postgres",
        }
    }

    pub fn parse(s: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == s)
    }

    pub fn needs_gateway(self) -> bool {
        !matches!(self, Case::Ceiling | Case::SqliteRef)
    }

    /// What one request of the case is, for the table.
    pub fn describe(self) -> &'static str {
        match self {
            Case::Ceiling => "bare hyper 1.x, fixed 200",
            Case::Chain => "gateway: 3x set_attribute + set_response (default monitoring)",
            Case::ChainMetricsOff => "the same chain, policy monitoring.enabled: false",
            Case::RefreshMemory => "refresh grant, memory store, metrics on",
            Case::MetricsOff => {
                "refresh grant, memory store, monitoring off (policy + both grant nodes)"
            }
            Case::MetricsOn => {
                "refresh grant, memory store, monitoring on (policy + both grant nodes)"
            }
            Case::SqliteRef => "SqlStore::rotate loop, SQLite, no HTTP",
            Case::RefreshSqlite => "refresh grant, SQLite store (WAL, synchronous=FULL)",
            Case::RefreshPostgres => "refresh grant, PostgreSQL store (server unpinned)",
        }
    }
}

/// Server on CPU 0 with one worker and the generator on CPU 1 (pinned), or both free with two
/// workers / two generator threads (unpinned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Placement {
    Pinned,
    Unpinned,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::Unpinned => "unpinned",
        }
    }
    fn workers(self) -> usize {
        match self {
            Placement::Pinned => 1,
            Placement::Unpinned => 2,
        }
    }
    /// `taskset -c CPU` in front of a command when pinned, and `nice -n -15` when allowed
    /// (see [`raised_priority`]).
    fn command(self, cpu: u32, program: &Path) -> Command {
        let mut words: Vec<std::ffi::OsString> = Vec::new();
        if raised_priority() {
            words.extend(["nice", "-n", NICE].map(Into::into));
        }
        if self == Placement::Pinned {
            words.extend(["taskset".into(), "-c".into(), cpu.to_string().into()]);
        }
        words.push(program.into());
        let mut c = Command::new(&words[0]);
        c.args(&words[1..]);
        c
    }
}

const NICE: &str = "-15";

/// Whether the measured processes can run at `nice -15`. On a shared machine (other sessions
/// compiling on the same two cores) a server at the default priority waits milliseconds for
/// every wake-up, which dominates any case that hands work between threads (sqlx's SQLite
/// worker); a higher priority isolates the measurement from the neighbours without changing
/// the work measured. Needs root or CAP_SYS_NICE; otherwise the runs use the default priority.
pub fn raised_priority() -> bool {
    static RAISED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RAISED.get_or_init(|| {
        Command::new("nice")
            .args(["-n", NICE, "nice"])
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == NICE)
    })
}

/// The executables of the workspace the harness drives.
#[derive(Clone, Debug)]
pub struct Bins {
    pub bench: PathBuf,
    pub gateway: PathBuf,
    pub ceiling: PathBuf,
}

impl Bins {
    /// The binaries next to the running `bench` (same target dir and profile).
    pub fn beside_current_exe() -> anyhow::Result<Bins> {
        let bench = std::env::current_exe().context("current exe")?;
        let dir = bench.parent().context("exe dir")?.to_path_buf();
        Ok(Bins {
            gateway: dir.join("gateway"),
            ceiling: dir.join("ceiling"),
            bench,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
    pub conns: usize,
}

/// Everything measured for one run of one case.
#[derive(Clone, Debug)]
pub struct Measured {
    pub case: Case,
    pub placement: Placement,
    pub outcome: Outcome,
    pub server_cpu_us_per_req: f64,
    /// Server CPU over the window as a share of one core (100 = one core busy).
    pub server_cpu_pct: f64,
    pub loadgen_cpu_pct: f64,
    pub steal_pct: f64,
    pub idle_rss_kb: Option<u64>,
    pub peak_rss_kb: Option<u64>,
}

/// Kills the child when dropped, so that a failed case never leaves a server behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_listening(addr: SocketAddr, server: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = server.try_wait()? {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("the server exited ({status}) before listening:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the server did not listen on {addr} within 30 s")
}

/// The pass-through chain; `{monitoring}` is empty or a policy-level `monitoring:` line.
const CHAIN_POLICY: &str = r#"
policies:
  - name: chain
    route: { path: /, methods: [GET] }
    {monitoring}
    chain:
      - { name: a1, type: set_attribute, attribute: bench.one, value: "1" }
      - { name: a2, type: set_attribute, attribute: bench.two, value: "2" }
      - { name: a3, type: set_attribute, attribute: bench.three, value: "3" }
      - { name: hello, type: set_response, status: 200, body: "Hello, World!" }
"#;

/// The default token endpoint (policies/token.yaml: grant_type dispatched through
/// compare_attribute nodes) with `monitoring.enabled` set on the policy (its service context,
/// recorded by the engine) and on both grant nodes.
fn token_policy(metrics: bool) -> String {
    format!(
        r#"
policies:
  - name: token-endpoint
    service: oauth-token
    route: {{ path: /oauth/token, methods: [POST] }}
    monitoring: {{ enabled: {metrics} }}
    chain:
      - name: has-grant-type
        type: compare_attribute
        attribute: http.form.grant_type
        matches: "^.+$"
        on_failure: missing-grant-type
      - name: is-refresh
        type: compare_attribute
        attribute: http.form.grant_type
        equals: refresh_token
        on_failure: is-client-credentials
      - name: refresh
        type: refresh_access_token
        application_validation: {{ client_credentials_in: authorization_header, validate_scopes: true }}
        access_token: {{ store: tokens, expiry_secs: 3600, length: 54, type: Bearer }}
        refresh_token: {{ generate: true, expiry_secs: 43200, length: 46 }}
        monitoring: {{ enabled: {metrics} }}
      - name: is-client-credentials
        type: compare_attribute
        attribute: http.form.grant_type
        equals: client_credentials
        on_failure: unsupported-grant-type
      - name: client-credentials
        type: client_credentials
        application_validation: {{ client_credentials_in: authorization_header }}
        access_token: {{ store: tokens, expiry_secs: 3600, length: 54, type: Bearer }}
        include_refresh_token: true
        refresh_token: {{ expiry_secs: 43200, length: 46 }}
        monitoring: {{ enabled: {metrics} }}
      - name: unsupported-grant-type
        type: set_response
        status: 400
        content_type: application/json
        body: '{{"error":"unsupported_grant_type"}}'
      - name: missing-grant-type
        type: set_response
        status: 400
        content_type: application/json
        body: '{{"error":"invalid_request"}}'
"#
    )
}

pub fn default_pg_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Writes the policy folder of a gateway case; returns the PostgreSQL schema it uses, if any.
fn write_policies(case: Case, dir: &Path, pg_url: &str) -> anyhow::Result<Option<String>> {
    let mut schema = None;
    let store = match case {
        Case::Chain | Case::ChainMetricsOff => None,
        Case::RefreshMemory | Case::MetricsOff | Case::MetricsOn => {
            Some("{ type: memory, max_tokens: 1000000 }".to_owned())
        }
        Case::RefreshSqlite => Some(format!(
            "{{ type: sql, url: \"sqlite://{}/t.db\" }}",
            dir.display()
        )),
        Case::RefreshPostgres => {
            let name = format!(
                "bench_{}_{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros())
            );
            let s = format!("{{ type: sql, url: \"{pg_url}\", schema: {name} }}");
            schema = Some(name);
            Some(s)
        }
        Case::Ceiling | Case::SqliteRef => bail!("{} is not a gateway case", case.name()),
    };
    let settings = match &store {
        None => "limits: { max_connections: 10000 }\n".to_owned(),
        Some(s) => format!(
            "limits: {{ max_connections: 10000 }}\nstores:\n  tokens: {s}\n\
             applications: {{ type: file, path: state/clients.yaml }}\n"
        ),
    };
    std::fs::write(dir.join("gateway.yaml"), settings)?;
    let policy = match case {
        Case::Chain => CHAIN_POLICY.replace("{monitoring}", ""),
        Case::ChainMetricsOff => {
            CHAIN_POLICY.replace("{monitoring}", "monitoring: { enabled: false }")
        }
        Case::MetricsOff => token_policy(false),
        _ => token_policy(true),
    };
    std::fs::write(dir.join("policy.yaml"), policy)?;
    Ok(schema)
}

/// Registers a client through the gateway's own CLI; returns (client_id, secret).
fn add_client(gateway: &Path, dir: &Path) -> anyhow::Result<(String, String)> {
    let out = Command::new(gateway)
        .arg("clients")
        .arg("--policies")
        .arg(dir)
        .args([
            "add",
            "--name",
            "bench",
            "--scopes",
            "read write",
            "--grants",
            "client_credentials,refresh_token",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running {}", gateway.display()))?;
    if !out.status.success() {
        bail!(
            "gateway clients add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("clients add --json")?;
    let get = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .with_context(|| format!("{k} missing in clients add output"))
    };
    Ok((get("client_id")?, get("client_secret")?))
}

fn drop_pg_schema(pg_url: &str, schema: &str) {
    // Best effort: psql may be missing; the schema then stays (it is named per run).
    let _ = Command::new("psql")
        .arg(pg_url)
        .arg("-qc")
        .arg(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Samples taken at one edge of the measured window.
struct Sample {
    /// CPU time of each server, in the order they were given.
    servers_cpu: Vec<procfs::CpuSample>,
    loadgen_cpu: procfs::CpuSample,
    steal: (u64, u64),
    at: Instant,
}

fn sample(servers: &[u32], loadgen: u32) -> Sample {
    Sample {
        servers_cpu: servers
            .iter()
            .map(|&pid| procfs::CpuSample::of(pid))
            .collect(),
        loadgen_cpu: procfs::CpuSample::of(loadgen),
        steal: procfs::steal_and_total(),
        at: Instant::now(),
    }
}

/// Options for one run of a case.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// `perf record --call-graph dwarf` the server during the measured window into this file.
    pub perf: Option<PathBuf>,
}

pub fn run_case(
    bins: &Bins,
    case: Case,
    placement: Placement,
    timing: &Timing,
    pg_url: &str,
    opts: &RunOptions,
) -> anyhow::Result<Measured> {
    if case == Case::SqliteRef {
        return run_store_reference(bins, placement, timing);
    }
    let mut server = [start_server(bins, case, placement, pg_url)?];
    let mut measured = drive(bins, &mut server, placement, timing, opts)?;
    Ok(measured.remove(0))
}

/// Two servers at once on CPU 0 (one worker each), one load generator on CPU 1 sharing its
/// connections out between them in turn, one measured window for both: whatever slows the
/// core in that window (a neighbour, steal, the clock) slows both, so their ratio resolves
/// differences that sequential runs drown in the host's drift. The scheduler shares the core
/// equally between two busy threads, so requests/s divide as the inverse of CPU per request.
pub fn run_side_by_side(
    bins: &Bins,
    cases: [Case; 2],
    timing: &Timing,
    pg_url: &str,
) -> anyhow::Result<[Measured; 2]> {
    if timing.conns < 2 || !timing.conns.is_multiple_of(2) {
        bail!(
            "side by side needs an even number of connections (each server gets half), not {}",
            timing.conns
        );
    }
    let placement = Placement::Pinned;
    let mut servers = [
        start_server(bins, cases[0], placement, pg_url)?,
        start_server(bins, cases[1], placement, pg_url)?,
    ];
    let measured = drive(
        bins,
        &mut servers,
        placement,
        timing,
        &RunOptions::default(),
    )?;
    measured
        .try_into()
        .map_err(|_| anyhow::anyhow!("one result per server expected"))
}

/// A server process of one case, listening, with what it needs in its own temporary folder.
struct Server {
    case: Case,
    process: Guard,
    addr: SocketAddr,
    log: PathBuf,
    credentials: Option<(String, String)>,
    idle_rss_kb: Option<u64>,
    /// The PostgreSQL schema of the run, dropped with the server.
    schema: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
        if let Some((url, schema)) = &self.schema {
            drop_pg_schema(url, schema);
        }
    }
}

/// Starts `ceiling` or a gateway case (policy folder, store, client) and waits until it listens.
fn start_server(
    bins: &Bins,
    case: Case,
    placement: Placement,
    pg_url: &str,
) -> anyhow::Result<Server> {
    let tmp = tempfile::Builder::new().prefix("bench-").tempdir()?;
    let dir = tmp.path();
    let log = dir.join("server.log");
    let addr = free_addr()?;
    let mut schema = None;
    let mut credentials = None;
    let mut cmd = match case {
        Case::Ceiling => {
            let mut c = placement.command(0, &bins.ceiling);
            c.arg(addr.to_string());
            c
        }
        Case::SqliteRef => bail!("sqlite-ref is not a server"),
        _ => {
            schema = write_policies(case, dir, pg_url)?.map(|s| (pg_url.to_owned(), s));
            if !matches!(case, Case::Chain | Case::ChainMetricsOff) {
                credentials = Some(add_client(&bins.gateway, dir)?);
            }
            let mut c = placement.command(0, &bins.gateway);
            c.arg("run")
                .arg("--policies")
                .arg(dir)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--admin")
                .arg(free_addr()?.to_string());
            c
        }
    };
    cmd.env("GATEWAY_WORKER_THREADS", placement.workers().to_string())
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(&log)?)
        .stdout(std::fs::File::create(dir.join("server.out"))?)
        .stdin(Stdio::null());
    let process = Guard(
        cmd.spawn()
            .with_context(|| format!("starting the {} server", case.name()))?,
    );
    let mut server = Server {
        case,
        process,
        addr,
        log,
        credentials,
        idle_rss_kb: None,
        schema,
        _dir: tmp,
    };
    wait_listening(addr, &mut server.process.0, &server.log)?;
    std::thread::sleep(Duration::from_millis(300));
    server.idle_rss_kb = procfs::status_kb(&server.process.0.id().to_string(), "VmRSS");
    Ok(server)
}

/// Loads `servers` from one generator process (connections shared out in turn) and measures
/// each over the generator's one window.
fn drive(
    bins: &Bins,
    servers: &mut [Server],
    placement: Placement,
    timing: &Timing,
    opts: &RunOptions,
) -> anyhow::Result<Vec<Measured>> {
    let refresh = servers[0].credentials.is_some();
    if servers.iter().any(|s| s.credentials.is_some() != refresh) {
        bail!("servers driven together must take the same kind of request");
    }
    let pids: Vec<u32> = servers.iter().map(|s| s.process.0.id()).collect();

    let mut lg = placement.command(1, &bins.bench);
    lg.arg("loadgen")
        .arg("--conns")
        .arg(timing.conns.to_string())
        .arg("--threads")
        .arg(placement.workers().to_string())
        .arg("--warmup")
        .arg(timing.warmup.as_secs_f64().to_string())
        .arg("--secs")
        .arg(timing.duration.as_secs_f64().to_string());
    let mut secrets = String::new();
    for s in servers.iter() {
        lg.arg("--addr").arg(s.addr.to_string());
        if let Some((id, secret)) = &s.credentials {
            lg.arg("--client-id").arg(id);
            secrets.push_str(secret);
            secrets.push('\n');
        }
    }
    lg.env(crate::loadgen::SECRETS_ENV, secrets);
    if !refresh {
        lg.arg("--path").arg("/");
    }
    lg.stdout(Stdio::piped()).stdin(Stdio::null());
    let mut loadgen = Guard(lg.spawn().context("starting the load generator")?);
    let lg_pid = loadgen.0.id();
    let stdout = loadgen.0.stdout.take().context("loadgen stdout")?;

    let mut start = None;
    let mut stop = None;
    let mut outcomes = Vec::new();
    let mut perf = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        match line.as_str() {
            "START" => {
                start = Some(sample(&pids, lg_pid));
                if let Some(file) = &opts.perf {
                    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
                    perf = Some(Guard(
                        Command::new("perf")
                            // DWARF unwinding: release builds have no frame pointers.
                            .args([
                                "record",
                                "-F",
                                "499",
                                "--call-graph",
                                "dwarf,16384",
                                "-q",
                                "-o",
                            ])
                            .arg(file)
                            .arg("-p")
                            .arg(pids.join(","))
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .context("perf record")?,
                    ));
                }
            }
            "STOP" => {
                stop = Some(sample(&pids, lg_pid));
                if let Some(mut p) = perf.take() {
                    // SIGINT lets perf write its file; Guard's kill would lose it.
                    let _ = Command::new("kill")
                        .arg("-INT")
                        .arg(p.0.id().to_string())
                        .status();
                    let _ = p.0.wait();
                }
            }
            l if l.starts_with("RESULT ") => {
                let v: serde_json::Value = serde_json::from_str(&l["RESULT ".len()..])?;
                outcomes.push(Outcome::from_json(&v));
            }
            _ => {}
        }
    }
    let status = loadgen.0.wait()?;
    if !status.success() {
        bail!("the load generator failed ({status})");
    }
    let (Some(start), Some(stop)) = (start, stop) else {
        bail!("the load generator did not report a window");
    };
    if outcomes.len() != servers.len() {
        bail!(
            "the load generator reported {} results for {} servers",
            outcomes.len(),
            servers.len()
        );
    }
    let mut all = Vec::with_capacity(servers.len());
    for (i, (server, outcome)) in servers.iter_mut().zip(outcomes).enumerate() {
        let peak_rss_kb = procfs::status_kb(&server.process.0.id().to_string(), "VmHWM");
        if let Some(status) = server.process.0.try_wait()? {
            let log = std::fs::read_to_string(&server.log).unwrap_or_default();
            bail!(
                "the {} server exited during the run ({status}):\n{log}",
                server.case.name()
            );
        }
        let mut m = measured(server.case, placement, outcome, &start, &stop, i);
        m.idle_rss_kb = server.idle_rss_kb;
        m.peak_rss_kb = peak_rss_kb;
        all.push(m);
    }
    Ok(all)
}

/// The figures of server `i` over the window from `start` to `stop`.
fn measured(
    case: Case,
    placement: Placement,
    outcome: Outcome,
    start: &Sample,
    stop: &Sample,
    i: usize,
) -> Measured {
    let wall_us = stop.at.duration_since(start.at).as_secs_f64() * 1e6;
    let server_cpu = stop.servers_cpu[i].us_since(&start.servers_cpu[i]);
    let (steal, total) = (
        stop.steal.0.saturating_sub(start.steal.0),
        stop.steal.1.saturating_sub(start.steal.1),
    );
    Measured {
        case,
        placement,
        server_cpu_us_per_req: if outcome.requests > 0 {
            server_cpu / outcome.requests as f64
        } else {
            0.0
        },
        server_cpu_pct: 100.0 * server_cpu / wall_us,
        loadgen_cpu_pct: 100.0 * stop.loadgen_cpu.us_since(&start.loadgen_cpu) / wall_us,
        steal_pct: if total > 0 {
            100.0 * steal as f64 / total as f64
        } else {
            0.0
        },
        idle_rss_kb: None,
        peak_rss_kb: None,
        outcome,
    }
}

/// The store-only reference: the `bench sqlite-ref` process is both the load and the server;
/// it reports its window on stdout like the load generator and waits for stdin to close.
fn run_store_reference(
    bins: &Bins,
    placement: Placement,
    timing: &Timing,
) -> anyhow::Result<Measured> {
    let tmp = tempfile::Builder::new().prefix("bench-").tempdir()?;
    let dir = tmp.path();
    let secs = |d: Duration| d.as_secs_f64().to_string();
    let mut cmd = placement.command(0, &bins.bench);
    cmd.arg("sqlite-ref")
        .arg("--url")
        .arg(format!("sqlite://{}/t.db", dir.display()))
        .arg("--tasks")
        .arg(timing.conns.to_string())
        .arg("--warmup")
        .arg(secs(timing.warmup))
        .arg("--secs")
        .arg(secs(timing.duration))
        .env("GATEWAY_WORKER_THREADS", placement.workers().to_string())
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(dir.join("server.log"))?)
        .stdout(Stdio::piped())
        .stdin(Stdio::piped());
    let mut child = Guard(cmd.spawn().context("starting sqlite-ref")?);
    let pid = child.0.id();
    let stdout = child.0.stdout.take().context("stdout")?;
    let mut stdin = child.0.stdin.take();
    let (mut start, mut stop, mut outcome) = (None, None, None);
    let mut peak = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        match line.as_str() {
            "START" => start = Some(sample(&[pid], pid)),
            "STOP" => stop = Some(sample(&[pid], pid)),
            l if l.starts_with("RESULT ") => {
                let v: serde_json::Value = serde_json::from_str(&l["RESULT ".len()..])?;
                outcome = Some(Outcome::from_json(&v));
                peak = procfs::status_kb(&pid.to_string(), "VmHWM");
                if let Some(mut s) = stdin.take() {
                    let _ = s.write_all(b"\n");
                }
            }
            _ => {}
        }
    }
    let status = child.0.wait()?;
    if !status.success() {
        bail!("sqlite-ref failed ({status})");
    }
    let (Some(start), Some(stop), Some(outcome)) = (start, stop, outcome) else {
        bail!("sqlite-ref did not report a window and a result");
    };
    let mut m = measured(Case::SqliteRef, placement, outcome, &start, &stop, 0);
    m.peak_rss_kb = peak;
    // The reference is its own load: no separate generator.
    m.loadgen_cpu_pct = 0.0;
    Ok(m)
}
