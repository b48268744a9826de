//! `client_credentials`: the OAuth 2.0 client credentials grant (RFC 6749 §4.4), with the same
//! application validation and access-token settings as `refresh_access_token`. With
//! `include_refresh_token: true` (default false, as RFC 6749 §4.4.3 advises) it also issues a
//! refresh token, so machine clients can use the refresh grant.
//!
//! ```yaml
//! - name: issue
//!   type: client_credentials
//!   application_validation: { client_credentials_in: authorization_header }
//!   access_token: { store: tokens, expiry_secs: 3600, length: 54, type: Bearer }
//!   include_refresh_token: true
//!   refresh_token: { expiry_secs: 43200, length: 46 }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use store::{FamilyId, Grant, Issue, NewToken};

use crate::attributes::Param;
use crate::backend::{Backend, run_now};
use crate::client_auth::{ApplicationValidationConfig, GrantType};
use crate::monitor::{MonitoringConfig, StoreOp};
use crate::oauth::{
    self, AccessTokenConfig, ErrorCode, GrantBase, OAuthError, join_scope, parse_scope,
};
use crate::registry::{BuildContext, BuildError, parse};
use crate::{Exchange, Filter, FilterError, Flow, SharedFilter};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshSettings {
    pub expiry_secs: u64,
    pub length: usize,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        RefreshSettings {
            expiry_secs: 43_200,
            length: 46,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub application_validation: ApplicationValidationConfig,
    pub access_token: AccessTokenConfig,
    pub include_refresh_token: bool,
    pub refresh_token: RefreshSettings,
    pub monitoring: MonitoringConfig,
}

struct ClientCredentials {
    base: GrantBase,
    include_refresh_token: bool,
    refresh: RefreshSettings,
}

pub fn build(value: serde_yaml::Value, cx: &BuildContext) -> Result<SharedFilter, BuildError> {
    let c: Config = parse(value)?;
    let refresh = c
        .include_refresh_token
        .then_some((c.refresh_token.expiry_secs, c.refresh_token.length));
    let base = GrantBase::build(
        c.application_validation,
        c.access_token,
        c.monitoring,
        refresh,
        cx,
    )?;
    Ok(Arc::new(ClientCredentials {
        base,
        include_refresh_token: c.include_refresh_token,
        refresh: c.refresh_token,
    }))
}

impl ClientCredentials {
    fn fail(&self, ex: &mut Exchange, e: OAuthError) -> Flow {
        ex.set("oauth.error", e.code.as_str());
        Flow::Fail(e.into_failure())
    }

    async fn grant(&self, ex: &mut Exchange, backend: &impl Backend) -> Result<Flow, FilterError> {
        let attribute = self.base.client_attribute;
        let app = match self
            .base
            .validation
            .admit(ex, GrantType::ClientCredentials, attribute, backend)
            .await?
        {
            Ok(app) => app,
            Err(e) => return Ok(self.fail(ex, e)),
        };
        let scope = match ex.form().single("scope") {
            Param::Repeated => {
                return Ok(self.fail(
                    ex,
                    OAuthError::new(ErrorCode::InvalidRequest, "scope is repeated"),
                ));
            }
            p => match p.value() {
                // No scope asked: everything the application is registered for.
                None => join_scope(
                    app.scopes
                        .iter()
                        .map(String::as_str)
                        .collect::<std::collections::BTreeSet<_>>(),
                ),
                Some(s) => {
                    let wanted = parse_scope(s);
                    let ok = oauth::valid_scope(s)
                        && !wanted.is_empty()
                        && (!self.base.validation.config.validate_scopes
                            || wanted.iter().all(|w| app.has_scope(w)));
                    if !ok {
                        let e = OAuthError::new(
                            ErrorCode::InvalidScope,
                            "the requested scope is not registered for this client",
                        );
                        return Ok(self.fail(ex, e));
                    }
                    join_scope(wanted)
                }
            },
        };
        let now = store::now();
        let mut metadata = BTreeMap::new();
        self.base.metadata.render_into(ex, &mut metadata);
        let (access, access_digest) = backend.mint(self.base.access.length);
        // A refresh token only for a client that may use it.
        let (refresh, refresh_digest) = (self.include_refresh_token
            && app.allows_grant("refresh_token"))
        .then(|| backend.mint(self.refresh.length))
        .unzip();
        let issue = Issue {
            grant: Arc::new(Grant {
                client_id: app.client_id.clone(),
                subject: Some(app.client_id.clone()),
                scope: scope.clone(),
                metadata,
            }),
            family: FamilyId::random(),
            generation: 0,
            issued_at: now,
            access: NewToken {
                digest: access_digest,
                expires_at: now + self.base.access.expiry_secs as i64,
            },
            refresh: refresh_digest.map(|digest| NewToken {
                digest,
                expires_at: now + self.refresh.expiry_secs as i64,
            }),
            replay: None,
            access_grant: None,
        };
        self.base
            .monitor
            .time(StoreOp::Issue, backend.issue(issue))
            .await?;
        if self.base.monitor.enabled() {
            self.base.monitor.metrics.token_issued("client_credentials");
        }
        let response = oauth::token_response(
            &access,
            &self.base.access.token_type,
            self.base.access.expiry_secs,
            refresh.as_deref(),
            &scope,
        );
        ex.set("oauth.scope", scope);
        Ok(Flow::Respond(response))
    }
}

#[async_trait]
impl Filter for ClientCredentials {
    async fn on_request(&self, ex: &mut Exchange) -> Result<Flow, FilterError> {
        self.grant(ex, &self.base.waiting()).await
    }

    fn on_request_now(&self, ex: &mut Exchange) -> Option<Result<Flow, FilterError>> {
        let backend = self.base.immediate()?;
        Some(run_now(self.grant(ex, &backend)))
    }

    fn monitoring(&self) -> Option<&MonitoringConfig> {
        Some(&self.base.monitor.config)
    }
}

#[cfg(test)]
mod tests {
    use store::SharedStore;

    use super::*;

    use crate::testing::{built, registry_with_app, token_request};

    async fn over(store: SharedStore) -> SharedFilter {
        let registry = registry_with_app("client_credentials").await;
        built(build, "{}", store, Some(registry)).0
    }

    fn cc_request() -> Exchange {
        token_request("grant_type=client_credentials")
    }

    /// The access token of a 200 token answer, and whether the store knows it.
    async fn issued(r: &crate::Response, store: &SharedStore) -> bool {
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        let access = body["access_token"].as_str().unwrap();
        let found = store
            .access_token(&store.token_digest(access), store::now())
            .await;
        found.unwrap().is_some_and(|t| t.grant.client_id == "app")
    }

    #[tokio::test]
    async fn over_the_memory_store_a_grant_answers_on_the_spot_and_otherwise_waits() {
        let memory: SharedStore = Arc::new(store::memory::MemoryStore::new(1_000));
        let filter = over(memory.clone()).await;
        let mut ex = cc_request();
        let Some(Ok(Flow::Respond(r))) = filter.on_request_now(&mut ex) else {
            panic!("the grant did not answer on the spot");
        };
        assert!(issued(&r, &memory).await);

        let waits = over(Arc::new(store::testing::ThroughFutures(memory.clone()))).await;
        let mut ex = cc_request();
        assert!(waits.on_request_now(&mut ex).is_none());
        let Ok(Flow::Respond(r)) = waits.on_request(&mut ex).await else {
            panic!("the waiting path must answer the grant");
        };
        assert!(issued(&r, &memory).await);
    }
}
