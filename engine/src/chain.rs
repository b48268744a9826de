//! Runs one request through its policy's chain of nodes.

use std::time::Instant;

use filters::{Exchange, Flow, Response};
use monitoring::{Monitoring, Outcome};

use crate::runtime::Policy;

/// The attribute that holds why the last node failed, for the nodes on its failure path.
pub const FAILURE_REASON: &str = "failure.reason";

/// What a chain run produced.
pub struct Finished {
    pub response: Response,
    pub outcome: Outcome,
    /// Indices of the nodes visited, in order (for the request's log line).
    pub trail: Vec<u16>,
}

/// Runs `ex` through `policy`: each node passes (its `on_success` edge; the chain ends after a
/// last node that passes, sending the response built so far), fails (its `on_failure` edge,
/// or the filter's own failure response), responds, or breaks (503/500). The graph was checked
/// for cycles at load time, so this always ends.
pub async fn run(policy: &Policy, ex: &mut Exchange, monitoring: &Monitoring) -> Finished {
    let mut trail = Vec::with_capacity(policy.nodes.len());
    let mut at = if policy.nodes.is_empty() {
        None
    } else {
        Some(0)
    };
    while let Some(i) = at {
        let node = &policy.nodes[i];
        trail.push(i as u16);
        let started = Instant::now();
        let flow = node.filter.on_request(ex).await;
        let elapsed = started.elapsed();
        match flow {
            Ok(Flow::Pass) => {
                monitoring.record_node(&policy.name, &node.name, Outcome::Success, elapsed);
                at = node.on_success;
            }
            Ok(Flow::Respond(response)) => {
                monitoring.record_node(&policy.name, &node.name, Outcome::Success, elapsed);
                let outcome = outcome_of(&response);
                return Finished {
                    response,
                    outcome,
                    trail,
                };
            }
            Ok(Flow::Fail(failure)) => {
                monitoring.record_node(&policy.name, &node.name, Outcome::Failure, elapsed);
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
                monitoring.record_node(&policy.name, &node.name, Outcome::Exception, elapsed);
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
