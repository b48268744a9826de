//! moka-backed store (placeholder until the token-store work lands).
use async_trait::async_trait;

use crate::*;

pub struct MemoryStore;

impl MemoryStore {
    pub fn new(_max_tokens: u64) -> Self {
        MemoryStore
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }
    async fn issue(&self, _issue: Issue) -> StoreResult<()> {
        Err(StoreError::Unavailable("not built".into()))
    }
    async fn access_token(&self, _d: &Digest, _now: UnixTime) -> StoreResult<Option<AccessToken>> {
        Err(StoreError::Unavailable("not built".into()))
    }
    async fn rotate(
        &self,
        _p: &Digest,
        _c: &str,
        _now: UnixTime,
        _decide: &(dyn Fn(&RefreshToken) -> RotateDecision + Send + Sync),
    ) -> StoreResult<RotateOutcome> {
        Err(StoreError::Unavailable("not built".into()))
    }
    async fn revoke_token(&self, _d: &Digest) -> StoreResult<bool> {
        Err(StoreError::Unavailable("not built".into()))
    }
    async fn revoke_family(&self, _f: FamilyId) -> StoreResult<u64> {
        Err(StoreError::Unavailable("not built".into()))
    }
    async fn purge_expired(&self, _now: UnixTime) -> StoreResult<u64> {
        Err(StoreError::Unavailable("not built".into()))
    }
    async fn count_live(&self, _now: UnixTime) -> StoreResult<u64> {
        Err(StoreError::Unavailable("not built".into()))
    }
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}
