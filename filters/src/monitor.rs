//! A filter's own "Monitoring settings" (product documents): enable monitoring, the attribute
//! that identifies the client, and whether its service context is a composite one.

use std::sync::Arc;

use monitoring::clock::Mark;
use monitoring::{Monitoring, StoreOpMetrics};
use serde::Deserialize;

use crate::registry::BuildContext;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringConfig {
    pub enabled: bool,
    /// The attribute that identifies the client; the OAuth filters set it to the client id
    /// once the client has authenticated.
    pub client_attribute: String,
    /// This filter's service context is a composite context, which a request enters when it
    /// reaches this filter: it wraps this filter and the service contexts after it, and passes
    /// only if all of them pass (and the answer is not an error).
    pub composite_context: bool,
    /// The service context name (default: the node's name).
    pub service: Option<String>,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            enabled: true,
            client_attribute: "authentication.subject.id".into(),
            composite_context: false,
            service: None,
        }
    }
}

/// What a filter keeps of its monitoring settings: the config (read by the engine through
/// [`crate::Filter::monitoring`]), the metrics handle for its own token counters, and the
/// latency of its store operations.
pub struct FilterMonitor {
    pub config: MonitoringConfig,
    pub metrics: Arc<Monitoring>,
    ops: [StoreOpMetrics; 3],
}

/// The store operations the grant filters time.
#[derive(Clone, Copy)]
pub enum StoreOp {
    Issue = 0,
    Rotate = 1,
    RevokeFamily = 2,
}

impl FilterMonitor {
    /// `store` names the token store whose operation latency this filter reports; the
    /// histogram handles are fetched once, here.
    /// A policy whose monitoring is off turns its filters' off too.
    pub fn new(mut config: MonitoringConfig, store: &str, cx: &BuildContext) -> Self {
        config.enabled &= cx.policy_monitoring;
        let store = cx.monitoring.store(store);
        FilterMonitor {
            config,
            metrics: cx.monitoring.clone(),
            ops: [
                store.op_handle("issue"),
                store.op_handle("rotate"),
                store.op_handle("revoke_family"),
            ],
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Runs one store operation, recording its latency when monitoring is on.
    pub async fn time<T>(&self, op: StoreOp, f: impl Future<Output = T>) -> T {
        if !self.config.enabled {
            return f.await;
        }
        let started = Mark::now();
        let out = f.await;
        self.ops[op as usize].record(started.elapsed());
        out
    }
}
