//! Runs one request through its policy's chain of nodes.

use filters::{Exchange, FilterError, Flow, Response};
use monitoring::clock::{Mark, Span};
use monitoring::{ClientLabel, Monitoring, Outcome};
use smallvec::SmallVec;

use crate::runtime::{Node, Policy};

/// The attribute that holds why the last node failed, for the nodes on its failure path.
pub const FAILURE_REASON: &str = "failure.reason";

/// What a chain run produced.
pub struct Finished {
    pub response: Response,
    pub outcome: Outcome,
    /// Indices of the nodes visited, in order (for the request's log line; empty when info
    /// logging is off).
    pub trail: Vec<u16>,
}

/// A request's way through its policy's chain: the node it is at, the node times and service
/// contexts recorded so far, the trail for the log line.
///
/// Each node passes (its `on_success` edge; the chain ends after a last node that passes,
/// sending the response built so far), fails (its `on_failure` edge, or the filter's own failure
/// response), responds, or breaks (503/500). The graph was checked for cycles at load time, so
/// a walk always ends.
///
/// Nodes that never wait answer through [`filters::Filter::on_request_now`], so a chain of them
/// runs in [`Walk::run_now`] without a future at all: the server answers such a request
/// without boxing or moving a request future. [`Walk::run`] goes on from there when a node
/// must wait.
pub struct Walk {
    at: Option<usize>,
    /// `run_now` stopped before node `at`: its filter declined to answer without waiting, so
    /// the next step awaits it instead of asking again.
    waiting: bool,
    /// The end of the last node, or the walk's start; `None` when the walk is not timed
    /// (`Policy::times_nodes`). One clock read serves as the end of a node and the start of
    /// the next.
    mark: Option<Mark>,
    /// Indices of the nodes visited; kept only when the request's log line is on.
    keep_trail: bool,
    trail: Vec<u16>,
    contexts: Contexts,
    /// The service contexts have been recorded: a second [`Walk::record`] (after a panic in
    /// the first) records nothing.
    recorded: bool,
}

impl Walk {
    /// A walk from the policy's first node; `start` is when its first node starts (the
    /// caller's clock read, when it has one).
    pub fn new(policy: &Policy, start: Mark) -> Self {
        // The trail only feeds the request's log line: no allocation when that line is off.
        let keep_trail = tracing::enabled!(tracing::Level::INFO);
        Walk {
            at: if policy.nodes.is_empty() {
                None
            } else {
                Some(0)
            },
            waiting: false,
            mark: policy.times_nodes.then_some(start),
            keep_trail,
            trail: Vec::with_capacity(if keep_trail { policy.nodes.len() } else { 0 }),
            contexts: Contexts::new(policy),
            recorded: false,
        }
    }

    /// Runs the nodes that answer without waiting. `None` when the walk stopped before a node
    /// that must wait: [`Walk::run`] goes on from it.
    pub fn run_now(&mut self, policy: &Policy, ex: &mut Exchange) -> Option<Finished> {
        while let Some(i) = self.at {
            let node = &policy.nodes[i];
            // The answer stays in its `Option` until `after` matches it: binding it out of the
            // `Option` here copies a whole `Flow` (a response's size, about 180 bytes) for
            // every node, when most nodes just pass.
            let answer = node.filter.on_request_now(ex);
            match answer {
                None => {
                    self.waiting = true;
                    return None;
                }
                // Most nodes pass: they go on here, without a call to `after` per node.
                Some(Ok(Flow::Pass)) => {
                    let elapsed = self.node_ended(i);
                    self.passed(policy, node, elapsed);
                }
                _ => {
                    if let Some(finished) = self.after(policy, i, ex, answer) {
                        return Some(finished);
                    }
                }
            }
        }
        Some(self.respond_pending(ex))
    }

    /// Runs the walk to its end, awaiting the nodes that must wait. Each node is asked once:
    /// one that declined in [`Walk::run_now`] is awaited, not asked again.
    pub async fn run(&mut self, policy: &Policy, ex: &mut Exchange) -> Finished {
        loop {
            if !self.waiting
                && let Some(finished) = self.run_now(policy, ex)
            {
                return finished;
            }
            self.waiting = false;
            let i = self.at.expect("run_now stops at a node");
            let flow = policy.nodes[i].filter.on_request(ex).await;
            if let Some(finished) = self.after(policy, i, ex, Some(flow)) {
                return finished;
            }
        }
    }

    /// The walk broke off (a node panicked, or the request ran out of time while a node
    /// waited): the node it was at ends now, as an exception, recorded like any node's end.
    pub fn interrupted(&mut self, policy: &Policy) {
        if let Some(i) = self.at.take() {
            let elapsed = self.node_ended(i);
            self.contexts
                .node(policy, &policy.nodes[i], Outcome::Exception, elapsed);
        }
    }

    /// The nodes visited so far (empty when the log line is off), for a walk that broke off.
    pub fn take_trail(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.trail)
    }

    /// When the last node ended, if the walk read the clock at all.
    pub fn last_mark(&self) -> Option<Mark> {
        self.mark
    }

    /// Records the service contexts the walk went through (once per request each, with the
    /// composites around them), once the walk is over; `request` is the request's whole time,
    /// which the policy's composite takes.
    pub fn record<'a>(
        &mut self,
        policy: &'a Policy,
        clients: &mut ClientLabels<'a>,
        overall: Outcome,
        request: Span,
    ) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        std::mem::take(&mut self.contexts).record(policy, clients, overall, request);
    }

    /// Takes node `i`'s answer: records it and moves to the next node, or ends the walk.
    /// `None` (a node that gave no answer, which the callers never pass) is a filter error.
    fn after(
        &mut self,
        policy: &Policy,
        i: usize,
        ex: &mut Exchange,
        answer: Option<Result<Flow, FilterError>>,
    ) -> Option<Finished> {
        let node = &policy.nodes[i];
        let elapsed = self.node_ended(i);
        match answer {
            Some(Ok(Flow::Pass)) => {
                self.passed(policy, node, elapsed);
                None
            }
            Some(Ok(Flow::Respond(response))) => {
                let outcome = outcome_of(&response);
                self.contexts.node(policy, node, outcome, elapsed);
                Some(self.finish(response, outcome))
            }
            Some(Ok(Flow::Fail(failure))) => {
                self.contexts.node(policy, node, Outcome::Failure, elapsed);
                if let Some(next) = node.on_failure {
                    ex.set(FAILURE_REASON, failure.reason);
                    self.at = Some(next);
                    return None;
                }
                Some(self.finish(failure.response, Outcome::Failure))
            }
            Some(Err(e)) => Some(self.broke(policy, node, e, elapsed)),
            None => {
                let e = FilterError::Internal("the node gave no answer".into());
                Some(self.broke(policy, node, e, elapsed))
            }
        }
    }

    /// A node passed after `elapsed`: it is recorded and the walk moves to its `on_success`
    /// edge.
    #[inline(always)]
    fn passed(&mut self, policy: &Policy, node: &Node, elapsed: Span) {
        self.contexts.node(policy, node, Outcome::Success, elapsed);
        self.at = node.on_success;
    }

    /// Node `i` ended: it joins the trail, and its time is taken when some node records it.
    #[inline(always)]
    fn node_ended(&mut self, i: usize) -> Span {
        if self.keep_trail {
            self.trail.push(i as u16);
        }
        match &mut self.mark {
            Some(mark) => {
                let now = Mark::now();
                let elapsed = mark.until(now);
                *mark = now;
                elapsed
            }
            None => Span::ZERO,
        }
    }

    /// The walk ends with this response.
    fn finish(&mut self, response: Response, outcome: Outcome) -> Finished {
        self.at = None;
        Finished {
            response,
            outcome,
            trail: self.take_trail(),
        }
    }

    /// A node that broke: an exception, answered with the error's response.
    fn broke(&mut self, policy: &Policy, node: &Node, e: FilterError, elapsed: Span) -> Finished {
        self.contexts
            .node(policy, node, Outcome::Exception, elapsed);
        tracing::error!(policy = %policy.name, node = %node.name, kind = node.kind, error = %e, "filter error");
        self.finish(e.to_response(), Outcome::Exception)
    }

    /// The end of a chain whose last node passed: the response the nodes built.
    fn respond_pending(&mut self, ex: &mut Exchange) -> Finished {
        let pending = std::mem::take(&mut ex.response);
        let mut response = http::Response::new(pending.body);
        *response.status_mut() = pending.status;
        *response.headers_mut() = pending.headers;
        let outcome = outcome_of(&response);
        Finished {
            response,
            outcome,
            trail: self.take_trail(),
        }
    }
}

/// Outcome and time of each service context that ran during one request, then of each
/// composite a node opened.
#[derive(Default)]
struct Contexts {
    /// One slot per service context of the policy, then (when a filter declares a composite)
    /// one per composite: the worst outcome and the time since a node opened it (see
    /// [`crate::runtime::Composite`]). Inline for up to two slots (the token endpoint has one
    /// context): no allocation per request for the usual policy, and a walk small enough that
    /// the request's future stays on the allocator's fast path.
    seen: SmallVec<[Option<(Outcome, Span)>; 2]>,
}

impl Contexts {
    fn new(policy: &Policy) -> Self {
        let composites = if policy.composites.iter().any(|c| !c.on_policy) {
            policy.composites.len()
        } else {
            0
        };
        Contexts {
            seen: smallvec::smallvec![None; policy.contexts.len() + composites],
        }
    }

    #[inline(always)]
    fn node(&mut self, policy: &Policy, node: &Node, outcome: Outcome, elapsed: Span) {
        if let Some(m) = &node.metrics {
            m.record(outcome, elapsed);
        }
        if let Some(i) = node.context {
            let slot = &mut self.seen[i];
            *slot = Some(match *slot {
                None => (outcome, elapsed),
                Some((o, d)) => (o.worst(outcome), d + elapsed),
            });
        }
        if self.seen.len() > policy.contexts.len() {
            self.through_composites(policy.contexts.len(), node, outcome, elapsed);
        }
    }

    /// A node's time counts in every composite it or a node before it opened; its outcome
    /// only in those it opened, or if it is a service (it runs in a context). The composites'
    /// slots start at `first`.
    #[inline(never)]
    fn through_composites(&mut self, first: usize, node: &Node, outcome: Outcome, elapsed: Span) {
        for (k, slot) in self.seen[first..].iter_mut().enumerate() {
            let opens = node.opens == Some(k);
            match slot {
                Some((o, d)) => {
                    *d += elapsed;
                    if opens || node.context.is_some() {
                        *o = o.worst(outcome);
                    }
                }
                None if opens => *slot = Some((outcome, elapsed)),
                None => {}
            }
        }
    }

    /// Records each service context seen, and each composite the request entered once: the
    /// policy's `request` long, with the worst of the contexts' outcomes and the request's
    /// own; a filter's from that filter on (see [`crate::runtime::Composite`]).
    fn record<'a>(
        self,
        policy: &'a Policy,
        clients: &mut ClientLabels<'a>,
        overall: Outcome,
        request: Span,
    ) {
        let (contexts, opened) = self.seen.split_at(policy.contexts.len());
        // The request as a whole is part of a composite too: a failure answered outside any
        // node-level context still fails it.
        let mut worst = overall;
        for (ctx, seen) in policy.contexts.iter().zip(contexts) {
            let Some((outcome, elapsed)) = *seen else {
                continue;
            };
            ctx.metrics
                .record(clients.of(&ctx.client_attribute), outcome, elapsed);
            worst = worst.worst(outcome);
        }
        for (k, composite) in policy.composites.iter().enumerate() {
            let (outcome, elapsed) = if composite.on_policy {
                (worst, request)
            } else {
                match opened.get(k) {
                    Some(&Some((o, d))) => (o.worst(overall), d),
                    // The request never reached the filter that declares it.
                    _ => continue,
                }
            };
            let client = clients.of(&composite.client_attribute);
            composite.metrics.record(client, outcome, elapsed);
        }
    }
}

/// The request's client label by attribute, for the policy and its service contexts: each
/// names the attribute that identifies the client, usually the same one. The last attribute
/// looked up is remembered, so the same attribute asked for in a row is looked up and resolved
/// once.
pub struct ClientLabels<'a> {
    ex: &'a Exchange,
    monitoring: &'a Monitoring,
    last: Option<(&'a str, ClientLabel)>,
}

impl<'a> ClientLabels<'a> {
    pub fn new(ex: &'a Exchange, monitoring: &'a Monitoring) -> Self {
        ClientLabels {
            ex,
            monitoring,
            last: None,
        }
    }

    /// The bounded label of the client named by `attribute` (see [`Monitoring::client`]).
    pub fn of(&mut self, attribute: &'a str) -> ClientLabel {
        if let Some((name, label)) = self.last
            && name == attribute
        {
            return label;
        }
        let label = self.monitoring.client(self.ex.get(attribute).as_deref());
        self.last = Some((attribute, label));
        label
    }
}

/// A request succeeds or fails by the answer it got, not by the path it took: a failure that
/// the policy handled on a failure path and answered with 200 is a success.
fn outcome_of(response: &Response) -> Outcome {
    let s = response.status();
    if s.is_server_error() {
        Outcome::Exception
    } else if s.is_client_error() {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}
