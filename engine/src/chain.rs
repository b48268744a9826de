//! Runs one request through its policy's chain of nodes.

use std::time::{Duration, Instant};

use filters::{Exchange, Flow, Response};
use monitoring::{Monitoring, Outcome};

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

/// Runs `ex` through `policy`: each node passes (its `on_success` edge; the chain ends after a
/// last node that passes, sending the response built so far), fails (its `on_failure` edge,
/// or the filter's own failure response), responds, or breaks (503/500). The graph was checked
/// for cycles at load time, so this always ends.
pub async fn run(policy: &Policy, ex: &mut Exchange, monitoring: &Monitoring) -> Finished {
    let mut contexts = Contexts::new(policy);
    let finished = walk(policy, ex, &mut contexts).await;
    contexts.record(policy, ex, monitoring, finished.outcome);
    finished
}

/// Outcome and time of each service context that ran during one request.
struct Contexts {
    seen: Vec<Option<(Outcome, Duration)>>,
}

impl Contexts {
    fn new(policy: &Policy) -> Self {
        // No allocation for the common policy without node-level contexts.
        Contexts {
            seen: if policy.contexts.is_empty() {
                Vec::new()
            } else {
                vec![None; policy.contexts.len()]
            },
        }
    }

    fn node(&mut self, node: &Node, outcome: Outcome, elapsed: Duration) {
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
    }

    fn record(self, policy: &Policy, ex: &Exchange, monitoring: &Monitoring, overall: Outcome) {
        let mut composite = policy.composite.as_ref().map(|c| {
            let client = ex.get(&policy.client_attribute);
            c.scope(monitoring.client(client.as_deref()))
        });
        for (i, seen) in self.seen.into_iter().enumerate() {
            let Some((outcome, elapsed)) = seen else {
                continue;
            };
            let ctx = &policy.contexts[i];
            let client = ex.get(&ctx.client_attribute);
            ctx.metrics
                .record(monitoring.client(client.as_deref()), outcome, elapsed);
            if let Some(scope) = &mut composite {
                scope.observe(outcome);
            }
        }
        if let Some(mut scope) = composite {
            // The request as a whole is part of the composite too: a failure answered
            // outside any node-level context still fails it.
            scope.observe(overall);
            let _ = scope.finish();
        }
    }
}

async fn walk(policy: &Policy, ex: &mut Exchange, contexts: &mut Contexts) -> Finished {
    // The trail only feeds the request's log line: no allocation when that line is off.
    let keep_trail = tracing::enabled!(tracing::Level::INFO);
    let mut trail = Vec::with_capacity(if keep_trail { policy.nodes.len() } else { 0 });
    let mut at = if policy.nodes.is_empty() {
        None
    } else {
        Some(0)
    };
    // One clock read serves as the end of a node and the start of the next; none when no node
    // records its time.
    let mut mark = policy.times_nodes.then(Instant::now);
    while let Some(i) = at {
        let node = &policy.nodes[i];
        if keep_trail {
            trail.push(i as u16);
        }
        let flow = match node.filter.on_request_now(ex) {
            Some(flow) => flow,
            None => node.filter.on_request(ex).await,
        };
        let elapsed = match &mut mark {
            Some(mark) => {
                let now = Instant::now();
                let elapsed = now - *mark;
                *mark = now;
                elapsed
            }
            None => Duration::ZERO,
        };
        match flow {
            Ok(Flow::Pass) => {
                contexts.node(node, Outcome::Success, elapsed);
                at = node.on_success;
            }
            Ok(Flow::Respond(response)) => {
                contexts.node(node, outcome_of(&response), elapsed);
                let outcome = outcome_of(&response);
                return Finished {
                    response,
                    outcome,
                    trail,
                };
            }
            Ok(Flow::Fail(failure)) => {
                contexts.node(node, Outcome::Failure, elapsed);
                match node.on_failure {
                    Some(next) => {
                        ex.set(FAILURE_REASON, failure.reason);
                        at = Some(next);
                    }
                    None => {
                        return Finished {
                            response: failure.response,
                            outcome: Outcome::Failure,
                            trail,
                        };
                    }
                }
            }
            Err(e) => {
                contexts.node(node, Outcome::Exception, elapsed);
                tracing::error!(policy = %policy.name, node = %node.name, kind = node.kind, error = %e, "filter error");
                return Finished {
                    response: e.to_response(),
                    outcome: Outcome::Exception,
                    trail,
                };
            }
        }
    }
    let pending = std::mem::take(&mut ex.response);
    let mut response = http::Response::new(pending.body);
    *response.status_mut() = pending.status;
    *response.headers_mut() = pending.headers;
    let outcome = outcome_of(&response);
    Finished {
        response,
        outcome,
        trail,
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
