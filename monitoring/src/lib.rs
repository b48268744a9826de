//! Service-usage monitoring for the gateway: one Prometheus registry per engine, the text
//! exposition served at `/metrics` on the admin listener, the shipped Grafana dashboard, and the
//! tracing-subscriber set-up ([`logging`]).
//!
//! # What is measured
//!
//! The seeds' monitoring settings (enable monitoring, the attribute that identifies the client,
//! composite context; see [`MonitoringSettings`]) drive:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `gateway_service_requests_total` | counter | `service`, `client`, `outcome` |
//! | `gateway_service_request_duration_seconds` | histogram | `service`, `client`, `outcome` |
//! | `gateway_composite_requests_total` | counter | `composite`, `client`, `outcome` |
//! | `gateway_composite_request_duration_seconds` | histogram | `composite`, `client`, `outcome` |
//! | `gateway_node_requests_total` | counter | `policy`, `node`, `outcome` |
//! | `gateway_node_duration_seconds` | histogram | `policy`, `node`, `outcome` |
//! | `gateway_tokens_issued_total` | counter | `grant_type` |
//! | `gateway_refresh_total` | counter | `outcome` |
//! | `gateway_store_live_tokens` | gauge | `store` |
//! | `gateway_store_purged_tokens_total` | counter | `store` |
//! | `gateway_store_operation_duration_seconds` | histogram | `store`, `op` |
//! | `gateway_requests_in_flight` | gauge | |
//! | `gateway_connections_open` | gauge | |
//! | `gateway_policy_reloads_total` | counter | `result` (`ok`, `error`) |
//! | `gateway_build_info` | gauge (1) | `version` |
//! | `process_*` | (process collector, Linux) | |
//!
//! `outcome` is `success`, `failure` or `exception` ([`Outcome`]). Every label value comes from
//! configuration (service, composite, policy, node and store names) or from a closed list
//! (outcomes, grant types, refresh outcomes). The `client` label is bounded: only ids registered
//! with [`Monitoring::set_known_clients`] become a label value, anything else is `other`, a
//! missing client is `anonymous`, and at most [`MonitoringConfig::max_client_labels`] ids ever
//! get a label. So no token or secret can become a label, whatever lands in the client attribute.
//!
//! # Using it on the hot path
//!
//! Resolve handles once when a policy is built, resolve the client once per request, and record
//! through the handles: no allocation, no lock, a few atomic updates per call.
//!
//! ```
//! use std::time::Duration;
//! use monitoring::clock::Mark;
//! use monitoring::{Monitoring, Outcome};
//!
//! let monitoring = Monitoring::new();
//! monitoring.set_known_clients(vec!["app-1".into()]);
//!
//! // Build time: one handle per service context, composite context and filter node.
//! let service_a = monitoring.service("serviceA");
//! let service_b = monitoring.service("serviceB");
//! let both = monitoring.composite("serviceA+B");
//! let node = monitoring.node("token-endpoint", "refresh");
//!
//! // Per request: the value of the configured client attribute (`authentication.subject.id`).
//! let client = monitoring.client(Some("app-1"));
//! let _in_flight = monitoring.in_flight(); // gauge decremented on drop
//!
//! // A composite context around serviceA then serviceB: it passes only if both pass.
//! let mut scope = both.scope(client);
//! // A mark's elapsed time is a `Span` in clock ticks: recorded without conversion. A
//! // `Duration` is recorded too (converted to ticks).
//! let started = Mark::now();
//! node.record(Outcome::Success, started.elapsed());
//! scope.record_service(&service_a, Outcome::Success, started.elapsed());
//! scope.record_service(&service_b, Outcome::Failure, Duration::from_micros(40));
//! assert_eq!(scope.finish(), Outcome::Failure); // recorded once, as a failure
//!
//! monitoring.refresh(monitoring::RefreshOutcome::Ok);
//! monitoring.token_issued("refresh_token");
//!
//! let text = monitoring.render(); // what `/metrics` serves
//! assert!(text.contains(r#"gateway_composite_requests_total{client="app-1",composite="serviceA+B",outcome="failure"} 1"#));
//! ```
//!
//! Without a composite, record a service directly: `service_a.record(client, outcome, elapsed)`.
//! The by-name methods ([`Monitoring::record_service`], [`Monitoring::record_node`], ...) do
//! the same after a map lookup; they suit cold paths and tests.
//!
//! # Wiring (what the engine does)
//!
//! - A node whose `monitoring.enabled` is `false` gets no handle and records nothing.
//! - `client_attribute` names the exchange attribute whose value goes to [`Monitoring::client`]
//!   (`None` when the attribute is missing).
//! - A composite is recorded once per request that enters it, with
//!   [`CompositeMetrics::record`]: the policy's `monitoring.composite` with the request's whole
//!   time and the worst outcome of its service contexts and of the answer; a filter's
//!   `composite_context: true` from that filter on (the requests that reach it, its time to the
//!   chain's end, its outcome and those of the contexts after it, and the answer's). A
//!   [`CompositeScope`] does the same for a caller that runs the services itself and times
//!   them from the scope's opening.
//! - [`Monitoring::set_known_clients`] with the application registry's ids at start-up and
//!   after each reload; [`Monitoring::store`] once per configured store at start-up, so the
//!   live-token and purged series exist before the first purge.
//!
//! # Grafana
//!
//! `monitoring/grafana/` holds `gateway-dashboard.json` (uid [`DASHBOARD_UID`]), its file
//! provisioning (`provisioning/dashboards.yaml`, `provisioning/datasources.yaml`) and a
//! Prometheus scrape config (`prometheus.yml`, scraping the admin listener). Every PromQL
//! expression of the dashboard is listed by [`dashboard_queries`].

#![forbid(unsafe_code)]

mod clients;
pub mod clock;
mod dashboard;
mod family;
pub mod logging;
mod settings;
mod store;
mod tokens;
mod usage;

use std::hash::Hash;
use std::sync::{Arc, RwLock};

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub use clients::{ANONYMOUS, ClientLabel, DEFAULT_MAX_CLIENT_LABELS, MAX_CLIENT_ID_LEN, OTHER};
pub use dashboard::{DASHBOARD_JSON, DASHBOARD_UID, dashboard_queries};
pub use settings::{DEFAULT_CLIENT_ATTRIBUTE, MonitoringSettings};
pub use store::{MAX_STORE_OPS, StoreMetrics, StoreOpMetrics};
pub use tokens::{GRANT_TYPES, RefreshOutcome};
pub use usage::{CompositeMetrics, CompositeScope, NodeMetrics, ServiceMetrics};

use clients::{Clients, FastMap};
use clock::Span;
use family::{FamilyDef, RowMetric, TimedFamily, ns};
use usage::{OutcomeSeries, UsageInner};

/// Content type of [`Monitoring::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Request and filter latency buckets, seconds: 0.5 ms to 10 s.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Store operation latency buckets, seconds: 10 µs (memory store) to 10 s (a slow database).
pub const STORE_BUCKETS: [f64; 16] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.5, 1.0, 10.0,
];

static DURATION_BUCKETS_NS: [u64; 14] = {
    let mut out = [0; 14];
    let mut i = 0;
    while i < 14 {
        out[i] = ns(DURATION_BUCKETS[i]);
        i += 1;
    }
    out
};

static STORE_BUCKETS_NS: [u64; 16] = {
    let mut out = [0; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = ns(STORE_BUCKETS[i]);
        i += 1;
    }
    out
};

/// Distinct service, composite, policy-node or store names per kind accepted by the by-name
/// methods; beyond it everything is recorded under `other`. Names come from configuration, so
/// this only guards against a caller passing a request value by mistake.
pub const MAX_NAMES: usize = 4096;

/// How one service context, filter node or request ended (Axway's pass / fail / exception).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Failure,
    Exception,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Success, Outcome::Failure, Outcome::Exception];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Exception => "exception",
        }
    }

    /// The worse of two outcomes: exception > failure > success.
    pub fn worst(self, other: Outcome) -> Outcome {
        if other.index() > self.index() {
            other
        } else {
            self
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Construction options of a [`Monitoring`].
#[derive(Clone, Debug)]
pub struct MonitoringConfig {
    /// Hard cap on distinct registered client ids exported as `client` label values.
    pub max_client_labels: usize,
    /// Register the process collector (`process_cpu_seconds_total`, ...; Linux only).
    pub process_metrics: bool,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            max_client_labels: DEFAULT_MAX_CLIENT_LABELS,
            process_metrics: true,
        }
    }
}

/// The engine's metrics. Cheap to share (`Arc<Monitoring>`); every method is safe to call
/// from any thread. Each instance owns its own registry: two engines in one process share
/// nothing.
pub struct Monitoring {
    registry: Registry,
    clients: Arc<Clients>,
    service_family: TimedFamily,
    composite_family: TimedFamily,
    node_family: TimedFamily,
    services: Names<Box<str>, ServiceMetrics>,
    composites: Names<Box<str>, CompositeMetrics>,
    nodes: NodeNames,
    stores: Names<Box<str>, StoreMetrics>,
    tokens_issued: RowMetric,
    refresh: RowMetric,
    store_live: IntGaugeVec,
    store_purged: IntCounterVec,
    store_ops: TimedFamily,
    in_flight: RowMetric,
    connections: RowMetric,
    reload_ok: IntCounter,
    reload_error: IntCounter,
}

impl Default for Monitoring {
    fn default() -> Self {
        Monitoring::new()
    }
}

impl std::fmt::Debug for Monitoring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitoring").finish_non_exhaustive()
    }
}

impl Monitoring {
    pub fn new() -> Self {
        Monitoring::with_config(MonitoringConfig::default())
    }

    pub fn with_config(config: MonitoringConfig) -> Self {
        let registry = Registry::new();
        // Every metric below is defined here, once, with fixed valid names and label names, in
        // a fresh registry: registration cannot fail unless this function is wrong.
        let reg = Registrar(&registry);

        let service_family = reg.timed(FamilyDef {
            counter: Some((
                "gateway_service_requests_total",
                "Requests per service context, client and outcome.",
            )),
            histogram: (
                "gateway_service_request_duration_seconds",
                "Time spent in a service context, by service, client and outcome.",
            ),
            label_names: &["service", "client", "outcome"],
            bounds_ns: &DURATION_BUCKETS_NS,
        });
        let composite_family = reg.timed(FamilyDef {
            counter: Some((
                "gateway_composite_requests_total",
                "Runs of a composite service context; it succeeds only if every service inside it succeeds.",
            )),
            histogram: (
                "gateway_composite_request_duration_seconds",
                "Time spent in a composite service context, by composite, client and outcome.",
            ),
            label_names: &["composite", "client", "outcome"],
            bounds_ns: &DURATION_BUCKETS_NS,
        });
        let node_family = reg.timed(FamilyDef {
            counter: Some((
                "gateway_node_requests_total",
                "Runs of a filter node, by policy, node and outcome.",
            )),
            histogram: (
                "gateway_node_duration_seconds",
                "Time spent in a filter node, by policy, node and outcome.",
            ),
            label_names: &["policy", "node", "outcome"],
            bounds_ns: &DURATION_BUCKETS_NS,
        });
        let tokens_issued = reg.rows(RowMetric::counter(
            "gateway_tokens_issued_total",
            "Access tokens issued, by grant type.",
            "grant_type",
            &GRANT_TYPES,
        ));
        let refresh = reg.rows(RowMetric::counter(
            "gateway_refresh_total",
            "Refresh-token requests, by outcome.",
            "outcome",
            &RefreshOutcome::LABELS,
        ));
        let store_live = reg.gauge_vec(
            "gateway_store_live_tokens",
            "Live tokens in a token store.",
            &["store"],
        );
        let store_purged = reg.counter_vec(
            "gateway_store_purged_tokens_total",
            "Tokens removed from a token store by the purge task: expired, or (memory store) of a revoked family.",
            &["store"],
        );
        let store_ops = reg.timed(FamilyDef {
            counter: None,
            histogram: (
                "gateway_store_operation_duration_seconds",
                "Latency of token store operations, by store and operation.",
            ),
            label_names: &["store", "op"],
            bounds_ns: &STORE_BUCKETS_NS,
        });
        let in_flight = reg.rows(RowMetric::gauge(
            "gateway_requests_in_flight",
            "Requests being processed that have waited (for a body, a store, a timer).",
        ));
        let connections = reg.rows(RowMetric::gauge(
            "gateway_connections_open",
            "Open client connections on the public listener.",
        ));
        let reloads = reg.counter_vec(
            "gateway_policy_reloads_total",
            "Policy reloads, by result.",
            &["result"],
        );
        let build_info = reg.gauge_vec(
            "gateway_build_info",
            "Build information of the running gateway (always 1).",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        if config.process_metrics {
            register_process_collector(&registry);
        }

        Monitoring {
            clients: Arc::new(Clients::new(config.max_client_labels)),
            service_family,
            composite_family,
            node_family,
            services: Names::default(),
            composites: Names::default(),
            nodes: NodeNames::default(),
            stores: Names::default(),
            tokens_issued,
            refresh,
            store_live,
            store_purged,
            store_ops,
            in_flight,
            connections,
            reload_ok: reloads.with_label_values(&["ok"]),
            reload_error: reloads.with_label_values(&["error"]),
            registry,
        }
    }

    /// This instance's registry (to register more collectors).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format, as served at `/metrics` (content type [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Client ids that may appear as a `client` label; anything else is counted as `other`.
    /// Replaces the previous set (call it again on reload). Ids beyond the cap, empty ids and
    /// ids longer than [`MAX_CLIENT_ID_LEN`] are counted as `other`.
    pub fn set_known_clients(&self, ids: Vec<String>) {
        self.clients.set_known(&ids);
    }

    /// Resolves the value of the client attribute for one request: `None` or empty is
    /// `anonymous`, an unregistered id is `other`. Resolve once per request.
    #[inline]
    pub fn client(&self, id: Option<&str>) -> ClientLabel {
        self.clients.resolve(id)
    }

    /// The handle of one service context (create it once, at build time).
    pub fn service(&self, name: &str) -> ServiceMetrics {
        self.services.get_or_create(name, |name| {
            ServiceMetrics(Arc::new(UsageInner::new(
                name,
                &self.service_family,
                &self.clients,
            )))
        })
    }

    /// The handle of one composite service context (create it once, at build time).
    pub fn composite(&self, name: &str) -> CompositeMetrics {
        self.composites.get_or_create(name, |name| {
            CompositeMetrics(Arc::new(UsageInner::new(
                name,
                &self.composite_family,
                &self.clients,
            )))
        })
    }

    /// Opens a composite scope by name (see [`CompositeScope`]); `client` as in
    /// [`Monitoring::client`].
    pub fn composite_scope(&self, composite: &str, client: Option<&str>) -> CompositeScope {
        self.composite(composite).scope(self.client(client))
    }

    /// The handle of one filter node of one policy (create it once, at build time).
    pub fn node(&self, policy: &str, node: &str) -> NodeMetrics {
        self.nodes.get_or_create(policy, node, |policy, node| {
            NodeMetrics(Arc::new(OutcomeSeries::new(
                &self.node_family,
                &[policy, node],
            )))
        })
    }

    /// The handle of one token store (create it once, at start-up).
    pub fn store(&self, name: &str) -> StoreMetrics {
        self.stores.get_or_create(name, |name| {
            StoreMetrics::new(
                name,
                self.store_live.with_label_values(&[name]),
                self.store_purged.with_label_values(&[name]),
                self.store_ops.clone(),
            )
        })
    }

    /// By name; `client` is the raw attribute value (empty = anonymous).
    pub fn record_service(
        &self,
        service: &str,
        client: &str,
        outcome: Outcome,
        elapsed: impl Into<Span>,
    ) {
        let client = self.client(Some(client));
        self.service(service).record(client, outcome, elapsed);
    }

    /// By name; `client` is the raw attribute value (empty = anonymous).
    pub fn record_composite(
        &self,
        composite: &str,
        client: &str,
        outcome: Outcome,
        elapsed: impl Into<Span>,
    ) {
        let client = self.client(Some(client));
        self.composite(composite).record(client, outcome, elapsed);
    }

    pub fn record_node(
        &self,
        policy: &str,
        node: &str,
        outcome: Outcome,
        elapsed: impl Into<Span>,
    ) {
        self.node(policy, node).record(outcome, elapsed);
    }

    /// One access token issued; an unknown grant type is counted as `other`.
    #[inline]
    pub fn token_issued(&self, grant_type: &str) {
        self.tokens_issued
            .add(tokens::grant_type_index(grant_type), 1);
    }

    /// One refresh request ended with `outcome` (see [`RefreshOutcome::from_label`]).
    #[inline]
    pub fn refresh_outcome(&self, outcome: &str) {
        self.refresh(RefreshOutcome::from_label(outcome));
    }

    #[inline]
    pub fn refresh(&self, outcome: RefreshOutcome) {
        self.refresh.add(outcome.index(), 1);
    }

    pub fn store_live(&self, store: &str, live: u64) {
        self.store(store).set_live(live);
    }

    pub fn store_purged(&self, store: &str, removed: u64) {
        self.store(store).purged(removed);
    }

    pub fn store_op(&self, store: &str, op: &str, elapsed: impl Into<Span>) {
        self.store(store).op(op, elapsed);
    }

    /// Counts one request in flight until the guard is dropped (also on panic or cancellation).
    pub fn in_flight(&self) -> GaugeGuard<'_> {
        GaugeGuard::new(&self.in_flight)
    }

    /// Counts one open connection until the guard is dropped.
    pub fn connection(&self) -> GaugeGuard<'_> {
        GaugeGuard::new(&self.connections)
    }

    /// One policy reload attempt and whether it was applied.
    pub fn reload(&self, ok: bool) {
        if ok {
            self.reload_ok.inc();
        } else {
            self.reload_error.inc();
        }
    }
}

/// Increments a gauge now and decrements it on drop (in the dropping thread's row, which may
/// not be the incrementing thread's: the rows' sum is what counts).
#[must_use = "the gauge is decremented when the guard is dropped"]
pub struct GaugeGuard<'a>(&'a RowMetric);

impl<'a> GaugeGuard<'a> {
    fn new(gauge: &'a RowMetric) -> Self {
        gauge.add(0, 1);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.add(0, -1);
    }
}

#[cfg(target_os = "linux")]
fn register_process_collector(registry: &Registry) {
    let collector = prometheus::process_collector::ProcessCollector::for_self();
    if let Err(e) = registry.register(Box::new(collector)) {
        tracing::warn!(error = %e, "process metrics unavailable");
    }
}

#[cfg(not(target_os = "linux"))]
fn register_process_collector(_registry: &Registry) {}

/// Defines metrics in one registry.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("static metric definitions register in a fresh registry");
        c
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"))
    }

    fn rows(&self, metric: prometheus::Result<RowMetric>) -> RowMetric {
        self.add(metric.expect("valid metric"))
    }

    fn timed(&self, def: FamilyDef) -> TimedFamily {
        self.add(TimedFamily::new(def).expect("valid histogram family"))
    }
}

/// A name -> handle cache for the by-name methods, with the [`MAX_NAMES`] cap.
struct Names<K, V> {
    map: RwLock<FastMap<K, V>>,
}

impl<K, V> Default for Names<K, V> {
    fn default() -> Self {
        Names {
            map: RwLock::new(FastMap::default()),
        }
    }
}

impl<V: Clone> Names<Box<str>, V> {
    fn get_or_create(&self, name: &str, make: impl FnOnce(&str) -> V) -> V {
        if let Some(v) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            return v.clone();
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let name = if map.len() < MAX_NAMES || map.contains_key(name) {
            name
        } else {
            OTHER
        };
        map.entry(Box::from(name))
            .or_insert_with(|| make(name))
            .clone()
    }
}

type NodeMap = FastMap<Box<str>, FastMap<Box<str>, NodeMetrics>>;

/// policy -> node -> handle, for [`Monitoring::node`]; the cap counts nodes.
struct NodeNames {
    map: RwLock<NodeMap>,
    len: std::sync::atomic::AtomicUsize,
}

impl Default for NodeNames {
    fn default() -> Self {
        NodeNames {
            map: RwLock::new(NodeMap::default()),
            len: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl NodeNames {
    fn get_or_create(
        &self,
        policy: &str,
        node: &str,
        make: impl FnOnce(&str, &str) -> NodeMetrics,
    ) -> NodeMetrics {
        let lookup =
            |map: &NodeMap, p: &str, n: &str| map.get(p).and_then(|nodes| nodes.get(n)).cloned();
        if let Some(v) = lookup(
            &self.map.read().unwrap_or_else(|e| e.into_inner()),
            policy,
            node,
        ) {
            return v;
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = lookup(&map, policy, node) {
            return v;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let (policy, node) = if self.len.load(Relaxed) < MAX_NAMES {
            (policy, node)
        } else {
            (OTHER, OTHER)
        };
        let nodes = map.entry(Box::from(policy)).or_default();
        if let Some(v) = nodes.get(node) {
            return v.clone();
        }
        self.len.fetch_add(1, Relaxed);
        let v = make(policy, node);
        nodes.insert(Box::from(node), v.clone());
        v
    }
}

#[cfg(test)]
mod tests;
