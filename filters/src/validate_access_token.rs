//! `validate_access_token`: the resource-server side (RFC 6750). Checks the bearer token of the
//! request against a token store and, when it is live, exposes what was stored with it as
//! attributes for the nodes after it: `authentication.subject.id`, `oauth.client_id`,
//! `oauth.scope`, `oauth.token.expires_in` and `oauth.token.metadata.NAME` for every metadata
//! pair the grant filters stored (the product documents' "additional meta data ... which can
//! subsequently be retrieved").
//!
//! ```yaml
//! - name: check-token
//!   type: validate_access_token
//!   store: tokens
//!   required_scopes: [read]     # every one must be granted (403 insufficient_scope otherwise)
//!   realm: api
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;
use store::SharedStore;

use crate::backend::{Backend, Immediate, Waiting, run_now};
use crate::oauth::parse_scope;
use crate::registry::{BuildContext, BuildError, parse};
use crate::{Exchange, Failure, Filter, FilterError, Flow, SharedFilter, json_response};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub store: String,
    pub required_scopes: Vec<String>,
    pub realm: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: "tokens".into(),
            required_scopes: Vec::new(),
            realm: "gateway".into(),
        }
    }
}

struct ValidateAccessToken {
    store: SharedStore,
    required: Vec<String>,
    realm: String,
}

pub fn build(value: serde_yaml::Value, cx: &BuildContext) -> Result<SharedFilter, BuildError> {
    let c: Config = parse(value)?;
    if c.realm.contains('"') || c.realm.contains('\\') {
        return Err(BuildError::at(
            "realm",
            "must not contain quotes or backslashes",
        ));
    }
    let store = cx.store("store", &c.store)?;
    Ok(Arc::new(ValidateAccessToken {
        store,
        required: c.required_scopes,
        realm: c.realm,
    }))
}

impl ValidateAccessToken {
    /// RFC 6750 §3: the challenge, with an error code when the client sent a token.
    fn deny(&self, status: StatusCode, code: Option<&'static str>, extra: &str) -> Flow {
        let mut challenge = format!("Bearer realm=\"{}\"", self.realm);
        if let Some(code) = code {
            challenge.push_str(&format!(", error=\"{code}\""));
        }
        challenge.push_str(extra);
        let body = match code {
            Some(code) => serde_json::json!({"error": code}),
            None => {
                serde_json::json!({"error": "invalid_request", "error_description": "a bearer token is required"})
            }
        };
        let mut r = json_response(status, &body);
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        Flow::Fail(Failure::new(code.unwrap_or("missing_token"), r))
    }
}

/// The token of `Authorization: Bearer <token>`; `Err` when the header is there but malformed,
/// or repeated (RFC 6750 §3.1: more than one way of including a token is `invalid_request`).
fn bearer(ex: &Exchange) -> Option<Result<&str, ()>> {
    let mut all = ex.headers().get_all(header::AUTHORIZATION).iter();
    let v = all.next()?;
    if all.next().is_some() {
        return Some(Err(()));
    }
    let v = match v.to_str() {
        Ok(v) => v.trim(),
        Err(_) => return Some(Err(())),
    };
    match v.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Some(Ok(token.trim()))
        }
        _ => Some(Err(())),
    }
}

impl ValidateAccessToken {
    async fn check(&self, ex: &mut Exchange, backend: &impl Backend) -> Result<Flow, FilterError> {
        let token = match bearer(ex) {
            None => return Ok(self.deny(StatusCode::UNAUTHORIZED, None, "")),
            Some(Err(())) => {
                return Ok(self.deny(StatusCode::BAD_REQUEST, Some("invalid_request"), ""));
            }
            Some(Ok(t)) => t,
        };
        let now = store::now();
        let Some(at) = backend
            .access_token(&backend.tokens().token_digest(token), now)
            .await?
        else {
            return Ok(self.deny(StatusCode::UNAUTHORIZED, Some("invalid_token"), ""));
        };
        let granted = parse_scope(&at.grant.scope);
        if !self.required.iter().all(|r| granted.contains(r.as_str())) {
            let scope = format!(", scope=\"{}\"", self.required.join(" "));
            return Ok(self.deny(StatusCode::FORBIDDEN, Some("insufficient_scope"), &scope));
        }
        let g = &at.grant;
        ex.set("oauth.client_id", g.client_id.clone());
        ex.set(
            "authentication.subject.id",
            g.subject.clone().unwrap_or_else(|| g.client_id.clone()),
        );
        ex.set("oauth.scope", g.scope.clone());
        ex.set(
            "oauth.token.expires_in",
            (at.expires_at - now).max(0).to_string(),
        );
        for (k, v) in &g.metadata {
            ex.set(format!("oauth.token.metadata.{k}"), v.clone());
        }
        Ok(Flow::Pass)
    }
}

#[async_trait]
impl Filter for ValidateAccessToken {
    async fn on_request(&self, ex: &mut Exchange) -> Result<Flow, FilterError> {
        let backend = Waiting {
            registry: None,
            store: &*self.store,
        };
        self.check(ex, &backend).await
    }

    fn on_request_now(&self, ex: &mut Exchange) -> Option<Result<Flow, FilterError>> {
        let backend = Immediate::of(None, &*self.store)?;
        Some(run_now(self.check(ex, &backend)))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn check(store: SharedStore) -> SharedFilter {
        crate::testing::built(build, "{required_scopes: [read]}", store, None).0
    }

    fn bearer_request(token: &str) -> Exchange {
        let (parts, ()) = http::Request::get("/api")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap()
            .into_parts();
        Exchange::new(parts, Bytes::new())
    }

    #[tokio::test]
    async fn over_the_memory_store_a_bearer_check_answers_on_the_spot_and_otherwise_waits() {
        let (memory, pair) = crate::testing::memory_with_pair().await;
        let memory: SharedStore = memory;
        let filter = check(memory.clone());

        let mut ex = bearer_request(&pair.access);
        assert!(matches!(
            filter.on_request_now(&mut ex),
            Some(Ok(Flow::Pass))
        ));
        assert_eq!(ex.get("oauth.client_id").as_deref(), Some("app"));
        let mut unknown = bearer_request("not-a-token");
        let Some(Ok(Flow::Fail(f))) = filter.on_request_now(&mut unknown) else {
            panic!("an unknown token must fail on the spot");
        };
        assert_eq!(f.reason, "invalid_token");

        // The same store through futures only: the check declines, then answers alike.
        let waits = check(Arc::new(store::testing::ThroughFutures(memory)));
        let mut ex = bearer_request(&pair.access);
        assert!(waits.on_request_now(&mut ex).is_none());
        assert!(ex.get("oauth.client_id").is_none());
        assert!(matches!(waits.on_request(&mut ex).await, Ok(Flow::Pass)));
        assert_eq!(ex.get("oauth.client_id").as_deref(), Some("app"));
    }

    #[tokio::test]
    async fn a_repeated_authorization_header_is_invalid_request_even_with_a_live_token_first() {
        let (memory, pair) = crate::testing::memory_with_pair().await;
        let filter = check(memory);
        let (parts, ()) = http::Request::get("/api")
            .header("authorization", format!("Bearer {}", pair.access))
            .header("authorization", "Bearer another")
            .body(())
            .unwrap()
            .into_parts();
        let mut ex = Exchange::new(parts, Bytes::new());
        let Ok(Flow::Fail(f)) = filter.on_request(&mut ex).await else {
            panic!("two Authorization headers must fail");
        };
        assert_eq!(f.reason, "invalid_request");
        assert_eq!(f.response.status(), 400);
        assert!(ex.get("oauth.client_id").is_none());
    }
}
