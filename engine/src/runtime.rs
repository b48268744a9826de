//! A policy set built into something that serves: stores opened, filters built, routes indexed.
//!
//! A [`Runtime`] is immutable. Hot reload builds a new one beside the old (reusing the stores
//! whose settings did not change, so tokens survive) and swaps it in atomically; requests in
//! flight finish on the runtime they started with.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use filters::{BuildContext, SharedFilter};
use http::Method;
use monitoring::{CompositeMetrics, Monitoring, NodeMetrics, ServiceMetrics};
use store::clients::SharedRegistry;
use store::{SharedStore, StoreConfig};
use tokio::task::JoinHandle;

use crate::config::{
    ApplicationsConfig, ConfigError, ConfigErrors, PathMatch, PolicySet, Settings, join_error_path,
};

/// One node of a built chain.
pub struct Node {
    pub name: Arc<str>,
    pub kind: &'static str,
    pub filter: SharedFilter,
    pub on_success: Option<usize>,
    pub on_failure: Option<usize>,
    /// `None` when monitoring is off for this node (its filter's or its policy's setting).
    pub metrics: Option<NodeMetrics>,
    /// Index into [`Policy::contexts`] of the service context this node runs in, if any.
    pub context: Option<usize>,
    /// Index into [`Policy::composites`] of the composite this node's filter declares (its
    /// `composite_context`), which a request enters when it reaches this node.
    pub opens: Option<usize>,
}

/// A service context of a policy's nodes (`service:` on a node, or a filter's own monitoring
/// settings), recorded once per request in which one of its nodes ran.
pub struct Context {
    pub metrics: ServiceMetrics,
    /// The attribute whose value labels the client.
    pub client_attribute: Arc<str>,
}

/// A composite context around service contexts, recorded once per request that enters it,
/// with the worst of its outcomes and of the answer's:
/// - the policy's `monitoring.composite` covers the whole chain: every request, its whole time
///   (as the policy's own context), every service context;
/// - a filter whose `composite_context` is true opens one where it stands: the requests that
///   reach it, from its start to the chain's end, the filter's outcome and those of the
///   service contexts after it.
pub struct Composite {
    pub metrics: CompositeMetrics,
    /// The attribute whose value labels the client: the policy's, or the declaring filter's.
    pub client_attribute: Arc<str>,
    /// Declared on the policy (else by a filter, which opens it: [`Node::opens`]).
    pub on_policy: bool,
}

pub struct Policy {
    pub name: Arc<str>,
    pub service: Arc<str>,
    /// The policy's own service context; `None` when the policy's monitoring is off.
    pub metrics: Option<ServiceMetrics>,
    pub client_attribute: Arc<str>,
    pub contexts: Vec<Context>,
    /// The composite contexts around `contexts`, each named once (empty when the policy's
    /// monitoring is off).
    pub composites: Vec<Composite>,
    pub nodes: Vec<Node>,
    /// Whether the walk is timed: some node records its time (node metrics or a node-level
    /// service context) or a filter's composite takes the time from that filter on. The chain
    /// reads the clock between nodes only then (the policy's composite takes the request's
    /// time, which needs no node's).
    pub times_nodes: bool,
}

/// A store with its background tasks. Shared by every runtime that uses it; the tasks stop
/// when the last runtime using the store is gone.
pub struct StoreHandle {
    pub config: StoreConfig,
    pub store: SharedStore,
    /// The purge task and the live-token gauge task.
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for StoreHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct RegistryHandle {
    pub config: ApplicationsConfig,
    pub registry: SharedRegistry,
}

pub struct Runtime {
    pub settings: Settings,
    pub policies: Vec<Policy>,
    pub router: Router,
    pub stores: HashMap<String, Arc<StoreHandle>>,
    pub registry: Option<Arc<RegistryHandle>>,
    pub warnings: Vec<ConfigError>,
}

/// Whether stores are opened for real (`run`) or stood in for (`check`: no database is
/// contacted, only the wiring is verified).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    Check,
}

/// Opens the stores and the registry of `set` (reusing those of `previous` whose settings are
/// unchanged) and builds every filter. Every error is collected.
pub async fn build(
    set: &PolicySet,
    previous: Option<&Runtime>,
    monitoring: &Arc<Monitoring>,
    mode: Mode,
) -> Result<Runtime, ConfigErrors> {
    let mut errors = Vec::new();
    let mut stores: HashMap<String, Arc<StoreHandle>> = HashMap::new();
    for (name, config) in &set.stores {
        if let Some(prev) = previous.and_then(|p| p.stores.get(name))
            && prev.config == *config
        {
            stores.insert(name.clone(), prev.clone());
            continue;
        }
        let origin = &set.store_origins[name];
        match open_store(name, config, monitoring, mode).await {
            Ok(h) => {
                stores.insert(name.clone(), Arc::new(h));
            }
            Err(m) => errors.push(set.error_at(origin, "", m)),
        }
    }
    let registry = match &set.applications {
        None => None,
        Some((config, origin)) => {
            match previous
                .and_then(|p| p.registry.as_ref())
                .filter(|r| r.config == *config)
            {
                Some(r) => Some(r.clone()),
                None => match open_registry(set, config, mode).await {
                    Ok(r) => Some(Arc::new(RegistryHandle {
                        config: config.clone(),
                        registry: r,
                    })),
                    Err(m) => {
                        errors.push(set.error_at(origin, "", m));
                        None
                    }
                },
            }
        }
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let plain: HashMap<String, SharedStore> = stores
        .iter()
        .map(|(n, h)| (n.clone(), h.store.clone()))
        .collect();
    let mut warnings = set.warnings.clone();
    let mut policies = Vec::new();
    for p in &set.policies {
        let mut nodes = Vec::new();
        let mut contexts: Vec<Context> = Vec::new();
        let policy_on = p.monitoring.enabled;
        let mut composites: Vec<Composite> = p
            .monitoring
            .composite
            .iter()
            .map(|c| Composite {
                metrics: monitoring.composite(c),
                client_attribute: p.monitoring.client_attribute.as_str().into(),
                on_policy: true,
            })
            .collect();
        for n in &p.nodes {
            let cx = BuildContext {
                stores: &plain,
                registry: registry.as_ref().map(|r| r.registry.clone()),
                monitoring: monitoring.clone(),
                policy: &p.name,
                policy_monitoring: policy_on,
                node: &n.name,
                warnings: RefCell::new(Vec::new()),
            };
            let built = (n.kind.build)(n.settings.clone(), &cx);
            for w in cx.warnings.take() {
                warnings.push(set.error_at(
                    &n.origin,
                    &join_error_path("", &w.path, &w.message),
                    w.message,
                ));
            }
            match built {
                Ok(filter) => {
                    let own = filter.monitoring();
                    let on = policy_on && own.is_none_or(|m| m.enabled);
                    // A node's service context: its `service:` key, else its filter's own
                    // monitoring settings (named after the node unless they say otherwise).
                    let context_name = n.service.clone().or_else(|| {
                        own.map(|m| m.service.clone().unwrap_or_else(|| n.name.clone()))
                    });
                    let mut opens = None;
                    let context = match (on, context_name) {
                        (true, Some(name)) => {
                            let client_attribute: Arc<str> = own
                                .map(|m| m.client_attribute.as_str())
                                .unwrap_or(&p.monitoring.client_attribute)
                                .into();
                            if own.is_some_and(|m| m.composite_context) {
                                // The filter's context is a composite around the contexts
                                // after it (one series per name, however many declare it; the
                                // policy's own, of the same name, already covers the chain).
                                match composites.iter().position(|c| c.metrics.name() == name) {
                                    Some(k) => opens = (!composites[k].on_policy).then_some(k),
                                    None => {
                                        composites.push(Composite {
                                            metrics: monitoring.composite(&name),
                                            client_attribute,
                                            on_policy: false,
                                        });
                                        opens = Some(composites.len() - 1);
                                    }
                                }
                                None
                            } else if name == p.service {
                                // The policy's own context, which counts every request once
                                // already: a second record of it would count this one twice.
                                None
                            } else {
                                Some(
                                    match contexts.iter().position(|c| c.metrics.name() == name) {
                                        Some(i) => i,
                                        None => {
                                            contexts.push(Context {
                                                metrics: monitoring.service(&name),
                                                client_attribute,
                                            });
                                            contexts.len() - 1
                                        }
                                    },
                                )
                            }
                        }
                        _ => None,
                    };
                    nodes.push(Node {
                        name: n.name.as_str().into(),
                        kind: n.kind.name,
                        filter,
                        on_success: n.on_success,
                        on_failure: n.on_failure,
                        metrics: on.then(|| monitoring.node(&p.name, &n.name)),
                        context,
                        opens,
                    });
                }
                Err(e) => {
                    let msg = config_message(&e.message);
                    errors.push(set.error_at(&n.origin, &join_error_path("", &e.path, &msg), msg))
                }
            }
        }
        if !policy_on {
            composites.clear();
        }
        policies.push(Policy {
            name: p.name.as_str().into(),
            service: p.service.as_str().into(),
            metrics: policy_on.then(|| monitoring.service(&p.service)),
            client_attribute: p.monitoring.client_attribute.as_str().into(),
            contexts,
            times_nodes: composites.iter().any(|c| !c.on_policy)
                || nodes
                    .iter()
                    .any(|n| n.metrics.is_some() || n.context.is_some()),
            composites,
            nodes,
        });
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let router = Router::new(set);
    Ok(Runtime {
        settings: set.settings.clone(),
        policies,
        router,
        stores,
        registry,
        warnings,
    })
}

fn config_message(m: &str) -> String {
    crate::config::yaml::clean_message(m)
}

async fn open_store(
    name: &str,
    config: &StoreConfig,
    monitoring: &Arc<Monitoring>,
    mode: Mode,
) -> Result<StoreHandle, String> {
    if mode == Mode::Check {
        // Wiring only: a memory store stands in, so no database is contacted.
        let store: SharedStore = Arc::new(store::memory::MemoryStore::new(16));
        return Ok(StoreHandle {
            config: config.clone(),
            store,
            tasks: Vec::new(),
        });
    }
    let store = store::open_store(config)
        .await
        .map_err(|e| format!("cannot open store {name:?}: {e}"))?;
    let metrics = monitoring.store(name);
    let purged = metrics.clone();
    let purge = store::purge::spawn(store.clone(), config.purge_interval(), move |n| {
        purged.purged(n)
    });
    let live = tokio::spawn(watch_live_tokens(store.clone(), metrics));
    Ok(StoreHandle {
        config: config.clone(),
        store,
        tasks: vec![purge, live],
    })
}

/// Keeps the live-token gauge of a store current (every 15 s; a count is cheap but not free).
async fn watch_live_tokens(store: SharedStore, metrics: monitoring::StoreMetrics) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Ok(n) = store.count_live(store::now()).await {
            metrics.set_live(n);
        }
    }
}

/// Opens the client registry the set names. A SQL registry gets its own small pool on the
/// store's database (the token store is only known here as a `dyn TokenStore`).
pub async fn open_registry(
    set: &PolicySet,
    config: &ApplicationsConfig,
    mode: Mode,
) -> Result<SharedRegistry, String> {
    match config {
        ApplicationsConfig::File { path } => {
            let path = set.dir.join(path);
            let r = store::clients::file::FileRegistry::open(&path)
                .map_err(|e| format!("cannot open the client registry {}: {e}", path.display()))?;
            Ok(Arc::new(r))
        }
        ApplicationsConfig::Sql { store } => {
            let Some(StoreConfig::Sql(c)) = set.stores.get(store) else {
                return Err(format!(
                    "applications.store: {store:?} is not a SQL store of this set"
                ));
            };
            if mode == Mode::Check {
                return Ok(Arc::new(store::clients::file::FileRegistry::in_memory()));
            }
            let sql = store::sql::SqlStore::connect(c)
                .await
                .map_err(|e| format!("cannot open store {store:?}: {e}"))?;
            // Lookups are reused for a second (CachedRegistry), not queried per request.
            Ok(Arc::new(store::clients::cached::CachedRegistry::new(
                Arc::new(sql),
            )))
        }
    }
}

/// Policy lookup by host, path and method.
pub struct Router {
    /// (path match, host, methods, policy index), most specific first.
    routes: Vec<(PathMatch, Option<String>, Vec<Method>, usize)>,
    /// Whether any route names a host (when none does, a request's host is never looked up).
    by_host: bool,
}

/// What the router found for a request.
pub enum RouteMatch {
    Policy(usize),
    /// The path exists, not for this method: 405 with `Allow`.
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

impl Router {
    fn new(set: &PolicySet) -> Self {
        let mut routes: Vec<_> = set
            .policies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    p.route.path.clone(),
                    p.route.host.clone(),
                    p.route.methods.clone(),
                    i,
                )
            })
            .collect();
        // Exact before prefix, longer prefix before shorter, a host before any host.
        routes.sort_by_key(|(m, host, _, _)| {
            let (exact, len) = match m {
                PathMatch::Exact(p) => (0, usize::MAX - p.len()),
                PathMatch::Prefix(p) => (1, usize::MAX - p.len()),
            };
            (exact, len, host.is_none())
        });
        let by_host = routes.iter().any(|(_, host, _, _)| host.is_some());
        Router { routes, by_host }
    }

    /// Whether [`Router::find`] needs the request's host: some route names one.
    pub fn routes_by_host(&self) -> bool {
        self.by_host
    }

    pub fn find(&self, host: Option<&str>, path: &str, method: &Method) -> RouteMatch {
        let mut allowed: Vec<Method> = Vec::new();
        for (m, h, methods, i) in &self.routes {
            let path_ok = match m {
                PathMatch::Exact(p) => p == path,
                PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            };
            let host_ok = match h {
                None => true,
                Some(h) => host.is_some_and(|x| x.eq_ignore_ascii_case(h)),
            };
            if !path_ok || !host_ok {
                continue;
            }
            if methods.is_empty() || methods.contains(method) {
                return RouteMatch::Policy(*i);
            }
            for m in methods {
                if !allowed.contains(m) {
                    allowed.push(m.clone());
                }
            }
        }
        if allowed.is_empty() {
            RouteMatch::NotFound
        } else {
            RouteMatch::MethodNotAllowed(allowed)
        }
    }
}
