//! A filter's own "Monitoring settings" (product documents): enable monitoring, the attribute
//! that identifies the client, and whether its service context is a composite one.

use std::sync::Arc;
use std::time::Instant;

use monitoring::{Monitoring, Outcome};
use serde::Deserialize;

use crate::registry::BuildContext;
use crate::{Exchange, FilterError, Flow};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringConfig {
    pub enabled: bool,
    /// The attribute that identifies the client; the OAuth filters set it to the client id
    /// once the client has authenticated.
    pub client_attribute: String,
    /// Record this filter's service context as a composite context.
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

/// Records a filter's service usage as its settings say.
pub struct FilterMonitor {
    pub config: MonitoringConfig,
    service: String,
    pub metrics: Arc<Monitoring>,
}

impl FilterMonitor {
    pub fn new(config: MonitoringConfig, cx: &BuildContext) -> Self {
        let service = config.service.clone().unwrap_or_else(|| cx.node.to_owned());
        FilterMonitor {
            config,
            service,
            metrics: cx.monitoring.clone(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    pub fn record(&self, ex: &Exchange, flow: &Result<Flow, FilterError>, started: Instant) {
        if !self.config.enabled {
            return;
        }
        let outcome = match flow {
            Ok(Flow::Respond(_) | Flow::Pass) => Outcome::Success,
            Ok(Flow::Fail(_)) => Outcome::Failure,
            Err(_) => Outcome::Exception,
        };
        let client = ex.get(&self.config.client_attribute);
        let client = client.as_deref().unwrap_or("anonymous");
        if self.config.composite_context {
            self.metrics
                .record_composite(&self.service, client, outcome, started.elapsed());
        } else {
            self.metrics
                .record_service(&self.service, client, outcome, started.elapsed());
        }
    }
}
