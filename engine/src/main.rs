//! `gateway`: run a folder of YAML policies, check it, or manage its client registry.
//!
//! Exit codes: 0 success; 1 runtime failure (cannot listen, store unreachable at start);
//! 2 usage error (clap); 3 invalid policy set.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use engine::{Gateway, Options, StartError};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "A policy-pipeline API gateway with an OAuth 2.0 token endpoint"
)]
struct Cli {
    /// Log as JSON lines instead of the human format (level from RUST_LOG, default info).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the policies of a folder until SIGTERM or SIGINT (SIGHUP reloads them).
    Run {
        /// The policy folder.
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// Override the `listen:` address of the policy set.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override the `admin:` address of the policy set.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Check a policy folder without starting anything; prints every error with its location.
    Check {
        /// The policy folder.
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
    /// Manage the client application registry named by the policy folder's `applications:`.
    Clients {
        /// The policy folder.
        #[arg(long, default_value = "policies", global = true)]
        policies: PathBuf,
        #[command(subcommand)]
        action: ClientsAction,
    },
}

#[derive(Subcommand)]
enum ClientsAction {
    /// Register an application; prints its id and secret once.
    Add {
        #[arg(long)]
        name: String,
        /// Space-separated scopes the application may hold.
        #[arg(long, default_value = "")]
        scopes: String,
        /// Comma-separated grant types (refresh_token, client_credentials).
        #[arg(long, default_value = "client_credentials,refresh_token")]
        grants: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the registered applications (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Disable an application: its credentials are refused from then on.
    Disable { client_id: String },
    /// Enable a disabled application again.
    Enable { client_id: String },
    /// Replace an application's secret; prints the new one once.
    RotateSecret {
        client_id: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    monitoring::logging::init(cli.log_json);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Run {
                policies,
                listen,
                admin,
            } => {
                run(Options {
                    policies,
                    listen,
                    admin,
                    extra_kinds: &[],
                })
                .await
            }
            Command::Check { dir } => check(dir).await,
            Command::Clients { policies, action } => match clients(policies, action).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("gateway clients: {e:#}");
                    ExitCode::from(1)
                }
            },
        }
    })
}

/// `GATEWAY_WORKER_THREADS` sets the tokio workers (the benchmark pins one); default: one per
/// core.
fn worker_threads() -> usize {
    std::env::var("GATEWAY_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

async fn run(options: Options) -> ExitCode {
    engine::install_panic_hook();
    let gw = match Gateway::start(options).await {
        Ok(gw) => gw,
        Err(StartError::Config(errors)) => {
            eprintln!("gateway: the policy set is invalid; nothing was started:\n{errors}");
            return ExitCode::from(3);
        }
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(1);
        }
    };
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            eprintln!("gateway: cannot install signal handlers");
            return ExitCode::from(1);
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = gw.reload().await;
            }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    gw.shutdown().await;
    ExitCode::SUCCESS
}

async fn check(dir: PathBuf) -> ExitCode {
    match engine::check(&dir).await {
        Ok(warnings) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: ok ({} warning{})",
                dir.display(),
                warnings.len(),
                if warnings.len() == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!(
                "{}: {} error{}",
                dir.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            ExitCode::from(3)
        }
    }
}

async fn clients(policies: PathBuf, action: ClientsAction) -> anyhow::Result<()> {
    let registry = engine::clients::open(&policies).await?;
    match action {
        ClientsAction::Add {
            name,
            scopes,
            grants,
            json,
        } => {
            let added = engine::clients::add(&registry, &name, &scopes, &grants).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "client_id": added.app.client_id,
                        "client_secret": added.secret,
                        "name": added.app.name,
                        "scopes": added.app.scopes,
                        "grant_types": added.app.grant_types,
                    })
                );
            } else {
                println!("client_id:     {}", added.app.client_id);
                println!("client_secret: {}", added.secret);
                println!("(the secret is shown once; only its SHA-256 digest is stored)");
            }
        }
        ClientsAction::List { json } => {
            let apps = registry.list().await?;
            if json {
                let v: Vec<_> = apps
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "client_id": a.client_id, "name": a.name, "enabled": a.enabled,
                            "scopes": a.scopes, "grant_types": a.grant_types, "created_at": a.created_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for a in apps {
                    println!(
                        "{}\t{}\t{}\tscopes=[{}]\tgrants=[{}]",
                        a.client_id,
                        a.name,
                        if a.enabled { "enabled" } else { "disabled" },
                        a.scopes.join(" "),
                        a.grant_types.join(",")
                    );
                }
            }
        }
        ClientsAction::Disable { client_id } => {
            registry.set_enabled(&client_id, false).await?;
            println!("{client_id}: disabled");
        }
        ClientsAction::Enable { client_id } => {
            registry.set_enabled(&client_id, true).await?;
            println!("{client_id}: enabled");
        }
        ClientsAction::RotateSecret { client_id, json } => {
            let secret = engine::clients::rotate_secret(&registry, &client_id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"client_id": client_id, "client_secret": secret})
                );
            } else {
                println!("client_id:     {client_id}");
                println!("client_secret: {secret}");
            }
        }
    }
    Ok(())
}
