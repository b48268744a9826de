//! Token-store metrics: live tokens, purged tokens, operation latency.

use crate::clock::Span;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus::{IntCounter, IntGauge};

use crate::clients::OTHER;
use crate::family::{Cell, TimedFamily};

/// Distinct `op` label values per store; further operation names are counted as `other`.
pub const MAX_STORE_OPS: usize = 32;

/// One token store (by its name in the gateway config). Obtain it once with
/// [`crate::Monitoring::store`]; that also creates its live-token gauge and purged counter at
/// zero, so the dashboard shows the store before its first purge.
#[derive(Clone)]
pub struct StoreMetrics(Arc<StoreInner>);

struct StoreInner {
    name: Box<str>,
    live: IntGauge,
    purged: IntCounter,
    op_family: TimedFamily,
    ops: RwLock<HashMap<Box<str>, Arc<Cell>>>,
}

impl StoreMetrics {
    pub(crate) fn new(
        name: &str,
        live: IntGauge,
        purged: IntCounter,
        op_family: TimedFamily,
    ) -> Self {
        StoreMetrics(Arc::new(StoreInner {
            name: Box::from(name),
            live,
            purged,
            op_family,
            ops: RwLock::new(HashMap::new()),
        }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Sets the number of live (unexpired, unrevoked) tokens in the store.
    pub fn set_live(&self, live: u64) {
        self.0.live.set(i64::try_from(live).unwrap_or(i64::MAX));
    }

    /// Adds `removed` to the purged-tokens total.
    pub fn purged(&self, removed: u64) {
        self.0.purged.inc_by(removed);
    }

    /// Observes one operation's latency. `op` should be a fixed name from code (`get`,
    /// `insert`, `rotate`, ...); for the hottest operations prefer [`StoreMetrics::op_handle`].
    pub fn op(&self, op: &str, elapsed: impl Into<Span>) {
        let elapsed = elapsed.into();
        if let Some(cell) = self.read_op(op) {
            cell.observe(elapsed);
            return;
        }
        self.op_handle(op).record(elapsed);
    }

    fn read_op(&self, op: &str) -> Option<Arc<Cell>> {
        let ops = self.0.ops.read().unwrap_or_else(|e| e.into_inner());
        ops.get(op).cloned()
    }

    /// The latency histogram of one operation, fetched once.
    pub fn op_handle(&self, op: &str) -> StoreOpMetrics {
        if let Some(h) = self.read_op(op) {
            return StoreOpMetrics(h);
        }
        let mut ops = self.0.ops.write().unwrap_or_else(|e| e.into_inner());
        let key = if ops.len() < MAX_STORE_OPS || ops.contains_key(op) {
            op
        } else {
            OTHER
        };
        let h = ops
            .entry(Box::from(key))
            .or_insert_with(|| self.0.op_family.cell(&[&self.0.name, key]))
            .clone();
        StoreOpMetrics(h)
    }
}

/// The latency histogram of one store operation.
#[derive(Clone)]
pub struct StoreOpMetrics(Arc<Cell>);

impl StoreOpMetrics {
    #[inline]
    pub fn record(&self, elapsed: impl Into<Span>) {
        self.0.observe(elapsed.into());
    }
}
