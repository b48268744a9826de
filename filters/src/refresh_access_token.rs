//! `refresh_access_token`: the OAuth 2.0 refresh-token grant (RFC 6749 §6), as the product
//! documents describe the "Refresh Access Token" filter.
//!
//! ```yaml
//! - name: refresh
//!   type: refresh_access_token
//!   application_validation:
//!     client_credentials_in: authorization_header   # | form_body | query_string
//!     client_id_field: client_id
//!     client_secret_field: client_secret
//!     validate_scopes: true
//!   access_token:
//!     store: tokens
//!     expiry_secs: 3600
//!     length: 54
//!     type: Bearer
//!     metadata: { Department: Engineering }
//!   refresh_token: { generate: true, expiry_secs: 43200, length: 46, reuse_grace_secs: 0 }
//!   monitoring: { enabled: true, client_attribute: authentication.subject.id, composite_context: false }
//! ```
//!
//! The presented refresh token is consumed in one atomic store step whether or not a new one is
//! generated. Presenting it again is reuse (RFC 9700 §4.14.2): the whole token family is
//! revoked and the filter fails with `refresh.reuse_detected` set, so a policy can branch on
//! it. With `reuse_grace_secs`, a retry with the immediately previous token inside the window
//! gets back the very response that was issued (sealed in the store under a key derived from
//! that token), so a client that lost the response is not stranded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use store::{Grant, Issue, NewToken, Replay, RotateDecision, RotateOutcome};

use crate::attributes::Param;
use crate::backend::{Backend, run_now};
use crate::client_auth::{ApplicationValidationConfig, GrantType};
use crate::monitor::{MonitoringConfig, StoreOp};
use crate::oauth::{
    self, AccessTokenConfig, ErrorCode, GrantBase, OAuthError, join_scope, parse_scope,
    scope_tokens,
};
use crate::registry::{BuildContext, BuildError, parse};
use crate::{Exchange, Filter, FilterError, Flow, SharedFilter};

/// "Refresh Token Details".
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshTokenConfig {
    /// Generate a new refresh token (a new pair) or an access token only. The presented
    /// refresh token is removed either way.
    pub generate: bool,
    pub expiry_secs: u64,
    pub length: usize,
    /// 0 (default): any second use is reuse. Otherwise a retry with the immediately previous
    /// token within this many seconds gets the same response back.
    pub reuse_grace_secs: u64,
}

impl Default for RefreshTokenConfig {
    fn default() -> Self {
        RefreshTokenConfig {
            generate: true,
            expiry_secs: 43_200,
            length: 46,
            reuse_grace_secs: 0,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub application_validation: ApplicationValidationConfig,
    pub access_token: AccessTokenConfig,
    pub refresh_token: RefreshTokenConfig,
    pub monitoring: MonitoringConfig,
}

struct RefreshAccessToken {
    base: GrantBase,
    refresh: RefreshTokenConfig,
}

pub fn build(value: serde_yaml::Value, cx: &BuildContext) -> Result<SharedFilter, BuildError> {
    let c: Config = parse(value)?;
    if c.refresh_token.reuse_grace_secs > 300 {
        return Err(BuildError::at(
            "refresh_token.reuse_grace_secs",
            "at most 300 s: a longer window weakens reuse detection",
        ));
    }
    let refresh = c
        .refresh_token
        .generate
        .then_some((c.refresh_token.expiry_secs, c.refresh_token.length));
    let base = GrantBase::build(
        c.application_validation,
        c.access_token,
        c.monitoring,
        refresh,
        cx,
    )?;
    Ok(Arc::new(RefreshAccessToken {
        base,
        refresh: c.refresh_token,
    }))
}

/// The plaintext of a rotation's new tokens, handed out of the store's decision.
struct Minted {
    access: String,
    refresh: Option<String>,
    scope: String,
}

fn replay_key(presented: &str) -> Key {
    // A different derivation from the lookup digest (plain SHA-256), so the store's own
    // column cannot open the sealed response.
    let mut h = Sha256::new();
    h.update(b"gateway refresh replay v1\0");
    h.update(presented.as_bytes());
    Key::from(<[u8; 32]>::from(h.finalize()))
}

fn seal(presented: &str, body: &[u8]) -> Option<Vec<u8>> {
    let nonce: [u8; 12] = rand::random();
    let ct = ChaCha20Poly1305::new(&replay_key(presented))
        .encrypt(Nonce::from_slice(&nonce), body)
        .ok()?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    Some(out)
}

fn open(presented: &str, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 12 {
        return None;
    }
    let (nonce, ct) = sealed.split_at(12);
    ChaCha20Poly1305::new(&replay_key(presented))
        .decrypt(Nonce::from_slice(nonce), ct)
        .ok()
}

impl RefreshAccessToken {
    fn fail(&self, ex: &mut Exchange, e: OAuthError, outcome: &str) -> Flow {
        ex.set("oauth.error", e.code.as_str());
        self.count(outcome);
        Flow::Fail(e.into_failure())
    }

    fn count(&self, outcome: &str) {
        if self.base.monitor.enabled() {
            self.base.monitor.metrics.refresh_outcome(outcome);
        }
    }

    async fn grant(&self, ex: &mut Exchange, backend: &impl Backend) -> Result<Flow, FilterError> {
        let attribute = self.base.client_attribute;
        let app = match self
            .base
            .validation
            .admit(ex, GrantType::RefreshToken, attribute, backend)
            .await?
        {
            Ok(app) => app,
            Err(e) => {
                let outcome = e.code.as_str();
                return Ok(self.fail(ex, e, outcome));
            }
        };
        // The token's digest is taken from the form in place; the token itself is kept only
        // where a response is sealed under it or opened with it (`reuse_grace_secs`).
        let grace = self.refresh.reuse_grace_secs > 0;
        let (digest, presented) = match ex.form().single("refresh_token") {
            Param::Repeated => {
                let e = OAuthError::new(ErrorCode::InvalidRequest, "refresh_token is repeated");
                return Ok(self.fail(ex, e, "invalid_request"));
            }
            p => match p.value() {
                Some(v) => (
                    backend.tokens().token_digest(v),
                    grace.then(|| v.to_owned()),
                ),
                None => {
                    let e = OAuthError::new(ErrorCode::InvalidRequest, "refresh_token is missing");
                    return Ok(self.fail(ex, e, "invalid_request"));
                }
            },
        };
        let requested: Option<String> = match ex.form().single("scope") {
            Param::Repeated => {
                let e = OAuthError::new(ErrorCode::InvalidRequest, "scope is repeated");
                return Ok(self.fail(ex, e, "invalid_request"));
            }
            p => p.value().map(str::to_owned),
        };
        if requested.as_deref().is_some_and(|s| !oauth::valid_scope(s)) {
            let e = OAuthError::new(ErrorCode::InvalidScope, "malformed scope");
            return Ok(self.fail(ex, e, "invalid_scope"));
        }

        let now = store::now();
        let mut metadata_extra = BTreeMap::new();
        self.base.metadata.render_into(ex, &mut metadata_extra);
        let minted: Mutex<Option<Minted>> = Mutex::new(None);
        let validate_registered = self.base.validation.config.validate_scopes;
        let decide = |old: &store::RefreshToken| -> RotateDecision {
            let scope = match &requested {
                // RFC 6749 §6: an omitted scope is the original grant's. With
                // validate_scopes, a scope the application is no longer registered for is left
                // out of the new access token (RFC 6749 §3.3: the response's `scope` says what
                // was issued), so taking a scope away from an application takes effect at its
                // next refresh; with none of the grant left, the answer is invalid_scope.
                None if validate_registered
                    && scope_tokens(&old.grant.scope).any(|s| !app.has_scope(s)) =>
                {
                    let kept = parse_scope(&old.grant.scope)
                        .into_iter()
                        .filter(|s| app.has_scope(s));
                    let kept = join_scope(kept);
                    if kept.is_empty() {
                        return RotateDecision::Reject;
                    }
                    kept
                }
                None => old.grant.scope.clone(),
                Some(r) => {
                    let granted = parse_scope(&old.grant.scope);
                    let wanted = parse_scope(r);
                    // RFC 6749 §6: never beyond the original grant; with validate_scopes,
                    // never beyond what the application is registered for today.
                    let within_grant = wanted.is_subset(&granted);
                    let within_app =
                        !validate_registered || wanted.iter().all(|s| app.has_scope(s));
                    if !within_grant || !within_app || wanted.is_empty() {
                        return RotateDecision::Reject;
                    }
                    join_scope(wanted)
                }
            };
            let (access, access_digest) = backend.mint(self.base.access.length);
            let (refresh, refresh_digest) = self
                .refresh
                .generate
                .then(|| backend.mint(self.refresh.length))
                .unzip();
            // The new refresh token keeps the presented one's scope (RFC 6749 §6); only the
            // access token carries a narrowed scope.
            // With no metadata to add, the grant is the presented token's, shared as it is.
            let grant = if metadata_extra.is_empty() {
                old.grant.clone()
            } else {
                let mut metadata = old.grant.metadata.clone();
                metadata.extend(metadata_extra.clone());
                Arc::new(Grant {
                    client_id: old.grant.client_id.clone(),
                    subject: old.grant.subject.clone(),
                    scope: old.grant.scope.clone(),
                    metadata,
                })
            };
            let access_grant = (scope != old.grant.scope).then(|| {
                Arc::new(Grant {
                    scope: scope.clone(),
                    ..(*grant).clone()
                })
            });
            let replay = presented
                .as_deref()
                .and_then(|presented| {
                    let body = oauth::token_response(
                        &access,
                        &self.base.access.token_type,
                        self.base.access.expiry_secs,
                        refresh.as_deref(),
                        &scope,
                    );
                    seal(presented, body.body())
                })
                .map(|sealed| Replay {
                    sealed,
                    until: now + self.refresh.reuse_grace_secs as i64,
                });
            let issue = Issue {
                grant,
                family: old.family,
                generation: old.generation + 1,
                issued_at: now,
                access: NewToken {
                    digest: access_digest,
                    expires_at: now + self.base.access.expiry_secs as i64,
                },
                refresh: refresh_digest.map(|digest| NewToken {
                    digest,
                    expires_at: now + self.refresh.expiry_secs as i64,
                }),
                replay,
                access_grant,
            };
            *minted.lock().expect("minted lock") = Some(Minted {
                access,
                refresh,
                scope,
            });
            RotateDecision::Rotate(issue)
        };
        let outcome = self
            .base
            .monitor
            .time(
                StoreOp::Rotate,
                backend.rotate(&digest, &app.client_id, now, &decide),
            )
            .await?;
        match outcome {
            RotateOutcome::Rotated { .. } => {
                let Some(m) = minted.lock().expect("minted lock").take() else {
                    return Err(FilterError::Internal(
                        "store rotated without a decision".into(),
                    ));
                };
                self.count("ok");
                if self.base.monitor.enabled() {
                    self.base.monitor.metrics.token_issued("refresh_token");
                }
                let response = oauth::token_response(
                    &m.access,
                    &self.base.access.token_type,
                    self.base.access.expiry_secs,
                    m.refresh.as_deref(),
                    &m.scope,
                );
                ex.set("oauth.scope", m.scope);
                Ok(Flow::Respond(response))
            }
            RotateOutcome::Rejected => {
                let e = OAuthError::new(
                    ErrorCode::InvalidScope,
                    "the requested scope exceeds the original grant or the client's registered scopes",
                );
                Ok(self.fail(ex, e, "invalid_scope"))
            }
            RotateOutcome::Invalid | RotateOutcome::WrongClient => {
                let e = OAuthError::new(
                    ErrorCode::InvalidGrant,
                    "the refresh token is invalid, expired or revoked",
                );
                Ok(self.fail(ex, e, "invalid_grant"))
            }
            RotateOutcome::AlreadyRotated { family, replay } => {
                if let Some(presented) = presented.as_deref()
                    && let Some(r) = replay.filter(|r| r.until > now)
                    && let Some(body) = open(presented, &r.sealed)
                {
                    self.count("replayed");
                    return Ok(Flow::Respond(oauth::token_response_from_body(Bytes::from(
                        body,
                    ))));
                }
                // Reuse: the family is compromised. The revocation must be written before we
                // answer; if the store fails, the error (503) goes out instead.
                let revoked = self
                    .base
                    .monitor
                    .time(StoreOp::RevokeFamily, backend.revoke_family(family))
                    .await?;
                tracing::warn!(client_id = %app.client_id, family = ?family, revoked, "refresh token reuse detected; token family revoked");
                ex.set("refresh.reuse_detected", "true");
                let e = OAuthError::new(
                    ErrorCode::InvalidGrant,
                    "the refresh token was already used",
                );
                let flow = self.fail(ex, e, "reuse_detected");
                if let Flow::Fail(mut f) = flow {
                    f.reason = "reuse_detected".into();
                    return Ok(Flow::Fail(f));
                }
                Ok(flow)
            }
        }
    }
}

impl RefreshAccessToken {
    /// Counts a grant that broke (a store or the registry unreachable).
    fn counted(&self, flow: Result<Flow, FilterError>) -> Result<Flow, FilterError> {
        if flow.is_err() {
            self.count("error");
        }
        flow
    }
}

#[async_trait]
impl Filter for RefreshAccessToken {
    async fn on_request(&self, ex: &mut Exchange) -> Result<Flow, FilterError> {
        let flow = self.grant(ex, &self.base.waiting()).await;
        self.counted(flow)
    }

    fn on_request_now(&self, ex: &mut Exchange) -> Option<Result<Flow, FilterError>> {
        let backend = self.base.immediate()?;
        Some(self.counted(run_now(self.grant(ex, &backend))))
    }

    fn monitoring(&self) -> Option<&MonitoringConfig> {
        Some(&self.base.monitor.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use store::{
        AccessToken, Digest, FamilyId, ImmediateStore, StoreError, StoreResult, TokenStore,
        UnixTime,
    };

    /// How long each rotation of [`RevocationFails`] takes.
    const ROTATION: std::time::Duration = std::time::Duration::from_millis(20);

    /// A store whose every refresh token has already been rotated (each rotation taking
    /// [`ROTATION`]) and whose revocations fail: the moment reuse is detected while the
    /// database goes away. With `immediate`, it also answers on the spot, as the memory store
    /// does.
    struct RevocationFails {
        immediate: bool,
    }

    impl ImmediateStore for RevocationFails {
        fn issue_now(&self, _: Issue) -> StoreResult<()> {
            Ok(())
        }
        fn access_token_now(&self, _: &Digest, _: UnixTime) -> StoreResult<Option<AccessToken>> {
            Ok(None)
        }
        fn rotate_now(
            &self,
            _: &Digest,
            _: &str,
            _: UnixTime,
            _: &store::Decide<'_>,
        ) -> StoreResult<RotateOutcome> {
            std::thread::sleep(ROTATION);
            Ok(RotateOutcome::AlreadyRotated {
                family: FamilyId(7),
                replay: None,
            })
        }
        fn revoke_family_now(&self, _: FamilyId) -> StoreResult<Option<u64>> {
            Err(StoreError::Unavailable("down".into()))
        }
    }

    #[async_trait]
    impl TokenStore for RevocationFails {
        fn kind(&self) -> &'static str {
            "test"
        }
        async fn issue(&self, issue: Issue) -> StoreResult<()> {
            self.issue_now(issue)
        }
        async fn access_token(
            &self,
            d: &Digest,
            now: UnixTime,
        ) -> StoreResult<Option<AccessToken>> {
            self.access_token_now(d, now)
        }
        async fn rotate(
            &self,
            presented: &Digest,
            client_id: &str,
            now: UnixTime,
            decide: &store::Decide<'_>,
        ) -> StoreResult<RotateOutcome> {
            self.rotate_now(presented, client_id, now, decide)
        }
        async fn revoke_token(&self, _: &Digest) -> StoreResult<bool> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn revoke_family(&self, family: FamilyId) -> StoreResult<Option<u64>> {
            self.revoke_family_now(family)
        }
        async fn purge_expired(&self, _: UnixTime) -> StoreResult<u64> {
            Ok(0)
        }
        async fn count_live(&self, _: UnixTime) -> StoreResult<u64> {
            Ok(0)
        }
        async fn ping(&self) -> StoreResult<()> {
            Err(StoreError::Unavailable("down".into()))
        }
        fn immediate(&self) -> Option<&dyn ImmediateStore> {
            self.immediate.then_some(self as &dyn ImmediateStore)
        }
    }

    #[tokio::test]
    async fn a_revocation_that_could_not_be_written_never_answers_200() {
        let filter = over(Arc::new(RevocationFails { immediate: false })).await;
        let mut ex = refresh_request("old");
        let flow = filter.on_request(&mut ex).await;
        let err = flow.expect_err("reuse detected but not revoked must be an error, not an answer");
        assert!(matches!(err, FilterError::Unavailable(_)));
        assert_eq!(err.to_response().status(), 503);
        assert!(
            err.to_response()
                .headers()
                .contains_key(http::header::RETRY_AFTER)
        );
    }

    use crate::testing::{built, memory_with_pair, registry_with_app, token_request};

    /// The filter over a file registry holding `app` and `store`.
    async fn over(store: store::SharedStore) -> SharedFilter {
        let registry = registry_with_app("refresh_token").await;
        built(build, "{}", store, Some(registry)).0
    }

    fn refresh_request(token: &str) -> Exchange {
        token_request(format!("grant_type=refresh_token&refresh_token={token}"))
    }

    #[tokio::test]
    async fn over_the_memory_store_and_a_file_registry_a_grant_answers_without_a_future() {
        let (memory, pair) = memory_with_pair().await;
        let filter = over(memory.clone()).await;

        let mut ex = refresh_request(&pair.refresh);
        let Some(Ok(Flow::Respond(r))) = filter.on_request_now(&mut ex) else {
            panic!("the grant did not answer on the spot");
        };
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        let new_refresh = body["refresh_token"].as_str().unwrap();
        // The rotation happened in the store: the old token is consumed, the new one rotates.
        let mut again = refresh_request(&pair.refresh);
        let Some(Ok(Flow::Fail(f))) = filter.on_request_now(&mut again) else {
            panic!("a replayed token must fail");
        };
        assert_eq!(f.reason, "reuse_detected");
        // Reuse revoked the family, the new refresh token with it.
        let mut next = refresh_request(new_refresh);
        let Some(Ok(Flow::Fail(f))) = filter.on_request_now(&mut next) else {
            panic!("a token of a revoked family must fail");
        };
        assert_eq!(f.reason, "invalid_grant");
    }

    #[tokio::test]
    async fn over_a_store_that_waits_the_filter_declines_and_the_waiting_path_answers_alike() {
        let (memory, pair) = memory_with_pair().await;
        let memory: store::SharedStore = memory;
        let filter = over(Arc::new(store::testing::ThroughFutures(memory.clone()))).await;

        let mut ex = refresh_request(&pair.refresh);
        assert!(filter.on_request_now(&mut ex).is_none());
        // Declining did nothing: no client set, no error, the token still live.
        assert!(ex.get("oauth.client_id").is_none());
        assert!(ex.get("oauth.error").is_none());
        let Ok(Flow::Respond(r)) = filter.on_request(&mut ex).await else {
            panic!("the waiting path must answer the grant");
        };
        assert_eq!(r.status(), 200);
        assert_eq!(ex.get("oauth.client_id").as_deref(), Some("app"));
        let consumed = memory
            .rotate(
                &memory.token_digest(&pair.refresh),
                "app",
                store::now(),
                &|_| RotateDecision::Reject,
            )
            .await
            .unwrap();
        assert!(matches!(consumed, RotateOutcome::AlreadyRotated { .. }));
    }

    #[tokio::test]
    async fn over_a_registry_that_waits_the_filter_declines_to_answer_on_the_spot() {
        let file = registry_with_app("refresh_token").await;
        let cached = Arc::new(store::clients::cached::CachedRegistry::new(file));
        let memory = Arc::new(store::memory::MemoryStore::new(1_000));
        let (filter, _) = built(build, "{}", memory, Some(cached));
        let mut ex = refresh_request("any");
        assert!(filter.on_request_now(&mut ex).is_none());
        assert!(ex.get("oauth.client_id").is_none());
    }

    #[tokio::test]
    async fn store_operations_answered_on_the_spot_are_timed_whole() {
        let registry = registry_with_app("refresh_token").await;
        let store = Arc::new(RevocationFails { immediate: true });
        let (filter, monitoring) = built(build, "{}", store, Some(registry));
        let mut ex = refresh_request("old");
        let Some(Err(FilterError::Unavailable(_))) = filter.on_request_now(&mut ex) else {
            panic!("reuse detected but not revoked must be an error, on the spot too");
        };
        let text = monitoring.render();
        let series = |op: &str| -> (f64, f64) {
            let value = |suffix: &str| {
                text.lines()
                    .find(|l| {
                        l.starts_with(&format!(
                            "gateway_store_operation_duration_seconds_{suffix}"
                        )) && l.contains(&format!("op=\"{op}\""))
                    })
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("no {suffix} series for {op}"))
            };
            (value("count"), value("sum"))
        };
        let (rotations, rotating) = series("rotate");
        assert_eq!(rotations, 1.0);
        assert!(
            rotating >= ROTATION.as_secs_f64(),
            "the rotation was timed at {rotating} s, it took {ROTATION:?}"
        );
        assert_eq!(series("revoke_family").0, 1.0);
    }

    /// What a node built of `config` does with a refresh of `token` without a scope, by `app`
    /// (registered for `read` only).
    async fn refresh_without_scope(
        memory: &Arc<store::memory::MemoryStore>,
        config: &str,
        token: &str,
    ) -> Flow {
        let registry = registry_with_app("refresh_token").await;
        let (filter, _) = built(build, config, memory.clone(), Some(registry));
        filter
            .on_request(&mut refresh_request(token))
            .await
            .unwrap()
    }

    fn body_of(flow: Flow) -> serde_json::Value {
        let Flow::Respond(r) = flow else {
            panic!("expected an answer");
        };
        assert_eq!(r.status(), 200);
        serde_json::from_slice(r.body()).unwrap()
    }

    /// The tokens the grant mints for a memory store start with the store's places, and the
    /// store finds them by those: ten grants in a row, twenty tokens, every one with a place
    /// (a random token reads as one about one time in thirteen).
    #[tokio::test]
    async fn minted_tokens_carry_the_memory_stores_places() {
        let (memory, pair) = memory_with_pair().await;
        let mut refresh = pair.refresh;
        for _ in 0..10 {
            let body = body_of(refresh_without_scope(&memory, "{}", &refresh).await);
            let access = body["access_token"].as_str().unwrap();
            let next = body["refresh_token"].as_str().unwrap();
            for token in [access, next] {
                let place = store::Place::parse(token).expect("a place");
                assert_eq!(memory.token_digest(token), place.digest(token));
            }
            let digest = memory.token_digest(access);
            let found = memory.access_token(&digest, store::now()).await;
            assert!(found.unwrap().is_some());
            refresh = next.to_owned();
        }
    }

    #[tokio::test]
    async fn an_omitted_scope_reissues_only_what_the_application_is_still_registered_for() {
        // Granted `read write`; `app` has since lost `write` in the registry.
        let (memory, pair) = memory_with_pair().await;
        let now = store::now();

        let body = body_of(refresh_without_scope(&memory, "{}", &pair.refresh).await);
        assert_eq!(body["scope"], "read", "{body}");
        let access = memory.token_digest(body["access_token"].as_str().unwrap());
        let at = memory.access_token(&access, now).await.unwrap().unwrap();
        assert_eq!(at.grant.scope, "read");
        // The new refresh token keeps the original grant (RFC 6749 §6): without the registry
        // check the whole of it comes back.
        let unchecked = "{application_validation: {validate_scopes: false}}";
        let next = body["refresh_token"].as_str().unwrap();
        let body = body_of(refresh_without_scope(&memory, unchecked, next).await);
        assert_eq!(body["scope"], "read write", "{body}");

        // Nothing of the grant left registered: invalid_scope, and the token is not consumed.
        let grant = Arc::new(store::Grant {
            scope: "write".into(),
            ..(*store::testing::grant("app")).clone()
        });
        let (issue, pair) = store::testing::new_issue(&*memory, grant, now, 3600, 7200);
        memory.issue(issue).await.unwrap();
        for _ in 0..2 {
            let Flow::Fail(f) = refresh_without_scope(&memory, "{}", &pair.refresh).await else {
                panic!("a grant with no registered scope left must fail");
            };
            assert_eq!(f.reason, "invalid_scope");
        }
        let body = body_of(refresh_without_scope(&memory, unchecked, &pair.refresh).await);
        assert_eq!(body["scope"], "write", "{body}");
    }

    #[test]
    fn sealed_responses_open_only_with_the_presented_token() {
        let sealed = seal("old-refresh-token", b"{\"access_token\":\"x\"}").unwrap();
        assert!(!sealed.windows(14).any(|w| w == b"\"access_token\""));
        assert_eq!(
            open("old-refresh-token", &sealed).unwrap(),
            b"{\"access_token\":\"x\"}"
        );
        assert!(open("another-token", &sealed).is_none());
        assert!(open("old-refresh-token", &sealed[..5]).is_none());
    }
}
