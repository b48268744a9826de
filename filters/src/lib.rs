//! The filter contract and every filter kind.
//!
//! A policy's chain is a graph of filter nodes. The engine hands each node an [`Exchange`] (the
//! request, the response being built, named attributes) and the node answers with a [`Flow`]:
//! pass (follow `on_success`), fail (follow `on_failure`, or send the failure's own response),
//! or respond (short-circuit with a response). `Err(FilterError)` means the filter itself broke
//! (a store is down): the engine answers 503/500 and counts an exception.
//!
//! Adding a kind: one file in this crate with a serde `Config` (`deny_unknown_fields`, defaults
//! from the product documents) and a `build` function, plus one line in [`registry`].

#![forbid(unsafe_code)]

pub mod attributes;
pub mod backend;
pub mod basic;
pub mod client_auth;
pub mod client_credentials;
pub mod monitor;
pub mod oauth;
pub mod refresh_access_token;
pub mod registry;
pub mod template;
#[cfg(test)]
mod testing;
pub mod validate_access_token;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

pub use attributes::Exchange;
pub use registry::{BuildContext, BuildError, KINDS, Kind, find_kind};

/// The response type filters build. The engine turns it into a hyper response.
pub type Response = http::Response<Bytes>;

/// What a node decided.
#[derive(Debug)]
pub enum Flow {
    /// Follow the node's `on_success` edge (by default the next node).
    Pass,
    /// Follow the node's `on_failure` edge; with none, send `Failure::response`.
    Fail(Failure),
    /// Stop here and send this response.
    Respond(Response),
}

/// A failure: why (stored in the `failure.reason` attribute for the failure path) and the
/// response the filter would send if the policy has no failure path.
#[derive(Debug)]
pub struct Failure {
    pub reason: String,
    pub response: Response,
}

impl Failure {
    pub fn new(reason: impl Into<String>, response: Response) -> Self {
        Failure {
            reason: reason.into(),
            response,
        }
    }
}

/// The filter itself broke. Never used for bad input: bad input is a [`Flow::Fail`].
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A dependency (token store, client registry) is unreachable: 503 with `Retry-After`.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected state: 500.
    #[error("{0}")]
    Internal(String),
}

impl From<store::StoreError> for FilterError {
    fn from(e: store::StoreError) -> Self {
        FilterError::Unavailable(e.to_string())
    }
}

impl From<store::RegistryError> for FilterError {
    fn from(e: store::RegistryError) -> Self {
        FilterError::Unavailable(e.to_string())
    }
}

impl FilterError {
    /// The JSON response the engine sends for this error. The message stays in the log: the
    /// client learns only that the server is unavailable or broke.
    pub fn to_response(&self) -> Response {
        match self {
            FilterError::Unavailable(_) => {
                let mut r = json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({
                        "error": "temporarily_unavailable",
                        "error_description": "a backing store is unavailable; retry shortly",
                    }),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                no_store(r.headers_mut());
                r
            }
            FilterError::Internal(_) => json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"error": "server_error"}),
            ),
        }
    }
}

/// One filter node at run time.
#[async_trait]
pub trait Filter: Send + Sync + 'static {
    async fn on_request(&self, ex: &mut Exchange) -> Result<Flow, FilterError>;

    /// The same decision without a future, for kinds that never wait (see [`SyncFilter`]),
    /// and for the token filters when their store and registry never wait (see [`backend`]).
    /// The engine asks this first and awaits [`Filter::on_request`] only on `None`, so such a
    /// node costs no boxed future per request. `None` must mean that nothing the decision depends
    /// on was done yet: the engine then awaits [`Filter::on_request`] on the same exchange.
    fn on_request_now(&self, _ex: &mut Exchange) -> Option<Result<Flow, FilterError>> {
        None
    }

    /// The filter's own "Monitoring settings", for kinds that have them (the OAuth filters).
    /// The engine reads them once at build time: a disabled filter records nothing, the
    /// client attribute labels its service context, and a composite context wraps the
    /// policy's other service contexts.
    fn monitoring(&self) -> Option<&monitor::MonitoringConfig> {
        None
    }
}

pub type SharedFilter = Arc<dyn Filter>;

/// A filter that never waits (compare, set, respond): one function gives it both entry points
/// of [`Filter`].
pub trait SyncFilter: Send + Sync + 'static {
    fn run(&self, ex: &mut Exchange) -> Result<Flow, FilterError>;
}

#[async_trait]
impl<T: SyncFilter> Filter for T {
    async fn on_request(&self, ex: &mut Exchange) -> Result<Flow, FilterError> {
        self.run(ex)
    }

    fn on_request_now(&self, ex: &mut Exchange) -> Option<Result<Flow, FilterError>> {
        Some(self.run(ex))
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut r = http::Response::new(Bytes::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `Cache-Control: no-store` and `Pragma: no-cache` (RFC 6749 §5.1): on every token answer.
pub fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// Metadata as configured: name -> value template.
pub type MetadataConfig = BTreeMap<String, String>;
