//! Service-usage monitoring: one Prometheus registry per engine, the text exposition served at
//! `/metrics` on the admin listener, and the tracing-subscriber set-up.
//!
//! (Skeleton: the API the engine and filters call. The monitoring issue fills it in.)

#![forbid(unsafe_code)]

pub mod logging;

use std::time::Duration;

/// How one service context, filter node or request ended (Axway's pass / fail / exception).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Failure,
    Exception,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Exception => "exception",
        }
    }
}

/// The engine's metrics. Cheap to share (`Arc<Monitoring>`); every method is safe to call
/// from any thread.
#[derive(Default)]
pub struct Monitoring {}

impl Monitoring {
    pub fn new() -> Self {
        Monitoring {}
    }

    /// The text exposition format, as served at `/metrics`.
    pub fn render(&self) -> String {
        String::new()
    }

    /// Client ids that may appear as a `client` label; anything else is counted as `other`.
    pub fn set_known_clients(&self, _ids: Vec<String>) {}

    pub fn record_service(&self, _service: &str, _client: &str, _outcome: Outcome, _elapsed: Duration) {}
    pub fn record_composite(&self, _composite: &str, _client: &str, _outcome: Outcome, _elapsed: Duration) {}
    pub fn record_node(&self, _policy: &str, _node: &str, _outcome: Outcome, _elapsed: Duration) {}
    pub fn token_issued(&self, _grant_type: &str) {}
    pub fn refresh_outcome(&self, _outcome: &str) {}
    pub fn store_live(&self, _store: &str, _live: u64) {}
    pub fn store_purged(&self, _store: &str, _removed: u64) {}
    pub fn store_op(&self, _store: &str, _op: &str, _elapsed: Duration) {}
    pub fn request_started(&self) {}
    pub fn request_finished(&self) {}
    pub fn connection_opened(&self) {}
    pub fn connection_closed(&self) {}
    pub fn reload(&self, _ok: bool) {}
}
