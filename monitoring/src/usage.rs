//! Service, composite and filter-node usage: pre-resolved handles for the hot path.

use std::sync::{Arc, OnceLock};

use crate::Outcome;
use crate::clients::{ClientLabel, Clients};
use crate::clock::{Mark, Span};
use crate::family::{Cell, TimedFamily};

/// The three series (one per outcome) of a family, fetched once.
pub(crate) struct OutcomeSeries([Arc<Cell>; 3]);

impl OutcomeSeries {
    /// `labels` are the leading label values; the outcome is appended as the last one.
    pub(crate) fn new(family: &TimedFamily, labels: &[&str]) -> Self {
        OutcomeSeries(Outcome::ALL.map(|o| {
            let mut values: Vec<&str> = labels.to_vec();
            values.push(o.as_str());
            family.cell(&values)
        }))
    }

    #[inline]
    pub(crate) fn record(&self, outcome: Outcome, elapsed: Span) {
        self.0[outcome.index()].observe(elapsed);
    }
}

pub(crate) struct UsageInner {
    name: Box<str>,
    family: TimedFamily,
    clients: Arc<Clients>,
    /// Indexed by [`ClientLabel`]; filled lazily, once per client.
    slots: Box<[OnceLock<Box<OutcomeSeries>>]>,
}

impl UsageInner {
    pub(crate) fn new(name: &str, family: &TimedFamily, clients: &Arc<Clients>) -> Self {
        let slots = (0..clients.slot_count()).map(|_| OnceLock::new()).collect();
        let inner = UsageInner {
            name: Box::from(name),
            family: family.clone(),
            clients: clients.clone(),
            slots,
        };
        // The anonymous series exist from the start, so the outcome ratios have data.
        inner.series(ClientLabel::ANONYMOUS);
        inner
    }

    #[inline]
    fn series(&self, client: ClientLabel) -> &OutcomeSeries {
        let client = if client.index() < self.slots.len() {
            client
        } else {
            ClientLabel::OTHER
        };
        self.slots[client.index()].get_or_init(|| {
            let value = self.clients.label_value(client);
            Box::new(OutcomeSeries::new(&self.family, &[&self.name, &value]))
        })
    }

    #[inline]
    fn record(&self, client: ClientLabel, outcome: Outcome, elapsed: Span) {
        self.series(client).record(outcome, elapsed);
    }
}

/// One service context (a policy, or a `service` name set in YAML): obtain it once at build
/// time with [`crate::Monitoring::service`], then record each request with no allocation and
/// no lock (two relaxed atomic additions once the client's series exist).
#[derive(Clone)]
pub struct ServiceMetrics(pub(crate) Arc<UsageInner>);

impl ServiceMetrics {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Counts one run of this service context for `client`, taking `elapsed`.
    #[inline]
    pub fn record(&self, client: ClientLabel, outcome: Outcome, elapsed: impl Into<Span>) {
        self.0.record(client, outcome, elapsed.into());
    }
}

/// One composite service context: a service context wrapped around several others, exported
/// as its own series. Per request, open a [`CompositeScope`] with [`CompositeMetrics::scope`].
#[derive(Clone)]
pub struct CompositeMetrics(pub(crate) Arc<UsageInner>);

impl CompositeMetrics {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Records one composite run directly (when the caller already knows the outcome).
    #[inline]
    pub fn record(&self, client: ClientLabel, outcome: Outcome, elapsed: impl Into<Span>) {
        self.0.record(client, outcome, elapsed.into());
    }

    /// Starts the composite for one request: the clock starts now.
    pub fn scope(&self, client: ClientLabel) -> CompositeScope {
        CompositeScope {
            metrics: self.clone(),
            client,
            started: Mark::now(),
            outcome: Outcome::Success,
            services: 0,
        }
    }
}

/// The request-scoped recorder of one composite context.
///
/// Fold in the outcome of every service context that runs inside the composite during the
/// request ([`observe`](Self::observe), or [`record_service`](Self::record_service) which also
/// records the service itself), then call [`finish`](Self::finish) once: it records the
/// composite a single time, with the elapsed time since [`CompositeMetrics::scope`].
///
/// The composite succeeds only if every service inside it succeeded: any exception makes it an
/// exception, otherwise any failure makes it a failure. A scope in which no service ran is a
/// success (nothing failed). A scope dropped without `finish` records nothing, so a request
/// cancelled half-way is not counted as a composite run.
#[must_use = "a composite scope records nothing until finish() is called"]
pub struct CompositeScope {
    metrics: CompositeMetrics,
    client: ClientLabel,
    started: Mark,
    outcome: Outcome,
    services: u32,
}

impl CompositeScope {
    /// Folds in the outcome of one service context run inside the composite.
    #[inline]
    pub fn observe(&mut self, outcome: Outcome) {
        self.outcome = self.outcome.worst(outcome);
        self.services = self.services.saturating_add(1);
    }

    /// Records `service` for this scope's client and folds its outcome into the composite.
    #[inline]
    pub fn record_service(
        &mut self,
        service: &ServiceMetrics,
        outcome: Outcome,
        elapsed: impl Into<Span>,
    ) {
        service.record(self.client, outcome, elapsed);
        self.observe(outcome);
    }

    /// The composite outcome so far.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// How many service outcomes were folded in.
    pub fn services(&self) -> u32 {
        self.services
    }

    pub fn client(&self) -> ClientLabel {
        self.client
    }

    /// Records the composite once and returns its outcome.
    pub fn finish(self) -> Outcome {
        self.metrics
            .record(self.client, self.outcome, self.started.elapsed());
        self.outcome
    }
}

/// One filter node of one policy: all series fetched at build time with
/// [`crate::Monitoring::node`].
#[derive(Clone)]
pub struct NodeMetrics(pub(crate) Arc<OutcomeSeries>);

impl NodeMetrics {
    #[inline]
    pub fn record(&self, outcome: Outcome, elapsed: impl Into<Span>) {
        self.0.record(outcome, elapsed.into());
    }
}
