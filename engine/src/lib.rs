//! The policy-pipeline gateway engine.
//!
//! [`Gateway::start`] loads a policy folder ([`config::load_dir`]), builds it
//! ([`runtime::build`]: stores opened, filters built, routes indexed) and serves it on two
//! listeners: the public one runs policies, the admin one serves `/healthz`, `/readyz`,
//! `/metrics` and `POST /reload`. [`reload`] swaps in a new policy set atomically, or refuses
//! it and keeps the old one. The `gateway` binary (src/main.rs) is a thin CLI over this.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let gw = engine::Gateway::start(engine::Options::new("policies")).await?;
//! println!("serving on {}", gw.public_addr);
//! gw.shutdown().await;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod chain;
pub mod clients;
pub mod config;
pub mod conn;
pub mod runtime;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use monitoring::Monitoring;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use config::{ConfigError, ConfigErrors};
use runtime::{Mode, Runtime};

/// How to start a gateway.
#[derive(Clone)]
pub struct Options {
    pub policies: PathBuf,
    /// Overrides `listen:` of the policy set (tests use `127.0.0.1:0`).
    pub listen: Option<SocketAddr>,
    /// Overrides `admin:` of the policy set.
    pub admin: Option<SocketAddr>,
    /// Filter kinds beside the built-in ones, for programs (and tests) that embed the engine.
    pub extra_kinds: &'static [filters::Kind],
}

impl Options {
    pub fn new(policies: impl Into<PathBuf>) -> Self {
        Options {
            policies: policies.into(),
            listen: None,
            admin: None,
            extra_kinds: &[],
        }
    }
}

/// Shared by both listeners and the reload paths.
pub struct State {
    pub runtime: ArcSwap<Runtime>,
    pub monitoring: Arc<Monitoring>,
    pub policies: PathBuf,
    extra_kinds: &'static [filters::Kind],
    /// One reload at a time (SIGHUP and `/reload` may race).
    reloading: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the policy set is invalid:\n{0}")]
    Config(ConfigErrors),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Gateway {
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: Arc<State>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Loads and builds the policy folder without opening any store or listener; returns the
/// warnings of a valid set. This is `gateway check`.
pub async fn check(dir: &std::path::Path) -> Result<Vec<ConfigError>, ConfigErrors> {
    load(dir, &[], None, &Arc::new(Monitoring::new()), Mode::Check)
        .await
        .map(|rt| rt.warnings)
}

/// Loads and builds `dir`. When loading finds errors, the builders still run (with stand-in
/// stores) on what could be loaded, so that one pass reports every error of the set.
async fn load(
    dir: &std::path::Path,
    extra: &'static [filters::Kind],
    previous: Option<&Runtime>,
    monitoring: &Arc<Monitoring>,
    mode: Mode,
) -> Result<Runtime, ConfigErrors> {
    let (set, mut errors) = config::load_dir_partial(dir, extra);
    let mode = if errors.is_empty() { mode } else { Mode::Check };
    let built = runtime::build(&set, previous, monitoring, mode).await;
    match built {
        Ok(rt) if errors.is_empty() => return Ok(rt),
        Ok(_) => {}
        Err(ConfigErrors(more)) => errors.extend(more),
    }
    config::sort_errors(&mut errors);
    Err(ConfigErrors(errors))
}

impl Gateway {
    pub async fn start(options: Options) -> Result<Gateway, StartError> {
        let monitoring = Arc::new(Monitoring::new());
        let rt = load(
            &options.policies,
            options.extra_kinds,
            None,
            &monitoring,
            Mode::Run,
        )
        .await
        .map_err(StartError::Config)?;
        for w in &rt.warnings {
            tracing::warn!("{w}");
        }
        let listen = options.listen.unwrap_or(rt.settings.listen);
        let admin = options.admin.unwrap_or(rt.settings.admin);
        let public_l = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: listen,
                source,
            })?;
        let admin_l = TcpListener::bind(admin)
            .await
            .map_err(|source| StartError::Listen {
                addr: admin,
                source,
            })?;
        let public_addr = public_l.local_addr().map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?;
        let admin_addr = admin_l.local_addr().map_err(|source| StartError::Listen {
            addr: admin,
            source,
        })?;
        let limits = rt.settings.limits.clone();
        let state = Arc::new(State {
            runtime: ArcSwap::from_pointee(rt),
            monitoring,
            policies: options.policies.clone(),
            extra_kinds: options.extra_kinds,
            reloading: Mutex::new(()),
        });
        let (tx, rx) = watch::channel(false);
        let known_clients = tokio::spawn(refresh_known_clients(state.clone(), rx.clone()));
        let tasks = vec![
            known_clients,
            tokio::spawn(server::serve(
                public_l,
                server::Listener::Public,
                limits.clone(),
                rx.clone(),
                state.clone(),
                server::public,
            )),
            tokio::spawn(server::serve(
                admin_l,
                server::Listener::Admin,
                limits,
                rx,
                state.clone(),
                server::admin,
            )),
        ];
        tracing::info!(%public_addr, %admin_addr, policies = %options.policies.display(), "gateway started");
        Ok(Gateway {
            public_addr,
            admin_addr,
            state,
            shutdown: tx,
            tasks,
        })
    }

    /// Re-reads the policy folder (as SIGHUP and `POST /reload` do).
    pub async fn reload(&self) -> Result<(), ConfigErrors> {
        reload(&self.state).await
    }

    /// Stops accepting, lets in-flight requests finish (bounded by `drain_timeout_secs`).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        tracing::info!("gateway stopped");
    }
}

/// Keeps the metrics' client label set in step with the registry: only registered client ids
/// become `client` label values (everything else is `other`), and the registry can change
/// while the gateway runs (`gateway clients add`).
async fn refresh_known_clients(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let registry = state.runtime.load().registry.clone();
        if let Some(r) = registry {
            match r.registry.list().await {
                Ok(apps) => state
                    .monitoring
                    .set_known_clients(apps.into_iter().map(|a| a.client_id).collect()),
                Err(e) => {
                    tracing::debug!(error = %e, "client registry not readable for metrics labels")
                }
            }
        }
    }
}

/// Builds the policy folder anew and swaps it in; on any error the running set stays.
pub async fn reload(state: &State) -> Result<(), ConfigErrors> {
    let _one_at_a_time = state.reloading.lock().await;
    let result: Result<(), ConfigErrors> = async {
        let current = state.runtime.load_full();
        let rt = load(
            &state.policies,
            state.extra_kinds,
            Some(&current),
            &state.monitoring,
            Mode::Run,
        )
        .await?;
        if rt.settings != current.settings {
            tracing::warn!("listen, admin and limits changes take effect at the next restart");
        }
        for w in &rt.warnings {
            tracing::warn!("{w}");
        }
        state.runtime.store(Arc::new(rt));
        Ok(())
    }
    .await;
    match &result {
        Ok(()) => {
            state.monitoring.reload(true);
            tracing::info!("policies reloaded");
        }
        Err(errors) => {
            state.monitoring.reload(false);
            tracing::error!(
                errors = errors.0.len(),
                "reload refused; the previous policies keep serving"
            );
            for e in &errors.0 {
                tracing::error!("{e}");
            }
        }
    }
    result
}

/// Panics inside a filter are turned into 500 responses by the server; this hook (installed
/// by the binary, not by tests) logs them through tracing as one line with the location, and
/// leaves the payload out since it could quote request data.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            tracing::error!(%location, "panic in request handling; answered 500");
        }));
    });
}
