//! How the token filters reach the client registry and their token store.
//!
//! A filter's logic is written once, as an `async fn` generic over [`Backend`]. [`Waiting`]
//! hands it the stores' futures (SQL stores, a cached SQL registry); [`Immediate`] calls a
//! store and a registry that never wait (the memory store, the file registry) in futures that
//! are done at their first poll. The filter then answers through
//! [`crate::Filter::on_request_now`]: [`run_now`] polls its future once, on the stack, so no
//! future is boxed for the filter or for any store operation, and a request whose nodes all
//! answer this way (a bearer check on a `GET`) runs without a request future at all.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use store::{
    AccessToken, ClientApplication, ClientRegistry, Decide, Digest, FamilyId, ImmediateRegistry,
    ImmediateStore, Issue, RegistryError, RotateOutcome, StoreResult, TokenStore, UnixTime,
};

use crate::FilterError;

/// A client registry and a token store, as a filter's logic uses them.
pub trait Backend: Sync {
    fn application(
        &self,
        client_id: &str,
    ) -> impl Future<Output = Result<Option<Arc<ClientApplication>>, RegistryError>> + Send;

    fn issue(&self, issue: Issue) -> impl Future<Output = StoreResult<()>> + Send;

    fn access_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> impl Future<Output = StoreResult<Option<AccessToken>>> + Send;

    fn rotate(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &Decide<'_>,
    ) -> impl Future<Output = StoreResult<RotateOutcome>> + Send;

    fn revoke_family(
        &self,
        family: FamilyId,
    ) -> impl Future<Output = StoreResult<Option<u64>>> + Send;

    /// The store itself, for what never waits: [`TokenStore::token_place`] and
    /// [`TokenStore::token_digest`].
    fn tokens(&self) -> &dyn TokenStore;

    /// A new token of `len` characters, with the place its store gives, and its digest.
    fn mint(&self, len: usize) -> (String, Digest) {
        let token = crate::oauth::generate_token(len, self.tokens().token_place());
        let digest = self.tokens().token_digest(&token);
        (token, digest)
    }
}

/// The stores' own futures.
pub struct Waiting<'a> {
    pub registry: Option<&'a dyn ClientRegistry>,
    pub store: &'a dyn TokenStore,
}

/// A store and a registry that answer on the spot.
pub struct Immediate<'a> {
    registry: Option<&'a dyn ImmediateRegistry>,
    store: &'a dyn ImmediateStore,
    tokens: &'a dyn TokenStore,
}

impl<'a> Immediate<'a> {
    /// `Some` when the store (and the registry, for a filter that authenticates clients) never
    /// wait.
    pub fn of(registry: Option<&'a dyn ClientRegistry>, store: &'a dyn TokenStore) -> Option<Self> {
        let registry = match registry {
            Some(r) => Some(r.immediate()?),
            None => None,
        };
        Some(Immediate {
            registry,
            store: store.immediate()?,
            tokens: store,
        })
    }
}

/// A filter built without a registry that asks for an application: a bug in the filter.
fn no_registry() -> RegistryError {
    RegistryError::Unavailable("this filter has no client registry".into())
}

impl Backend for Waiting<'_> {
    async fn application(
        &self,
        client_id: &str,
    ) -> Result<Option<Arc<ClientApplication>>, RegistryError> {
        match self.registry {
            Some(r) => r.get(client_id).await,
            None => Err(no_registry()),
        }
    }

    fn issue(&self, issue: Issue) -> impl Future<Output = StoreResult<()>> + Send {
        self.store.issue(issue)
    }

    // `async fn`s: a store's boxed future borrows its arguments for one lifetime that none of
    // these has alone.
    async fn access_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> StoreResult<Option<AccessToken>> {
        self.store.access_token(digest, now).await
    }

    async fn rotate(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &Decide<'_>,
    ) -> StoreResult<RotateOutcome> {
        self.store.rotate(presented, client_id, now, decide).await
    }

    fn revoke_family(
        &self,
        family: FamilyId,
    ) -> impl Future<Output = StoreResult<Option<u64>>> + Send {
        self.store.revoke_family(family)
    }

    fn tokens(&self) -> &dyn TokenStore {
        self.store
    }
}

// The work runs when the future is first polled, as it does for a store's own future, not
// when the future is made: whatever awaits it (`FilterMonitor::time`, which starts its clock at
// its first poll) measures the operation. Each future is done at that first poll.
impl Backend for Immediate<'_> {
    async fn application(
        &self,
        client_id: &str,
    ) -> Result<Option<Arc<ClientApplication>>, RegistryError> {
        match self.registry {
            Some(r) => r.get_now(client_id),
            None => Err(no_registry()),
        }
    }

    async fn issue(&self, issue: Issue) -> StoreResult<()> {
        self.store.issue_now(issue)
    }

    async fn access_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> StoreResult<Option<AccessToken>> {
        self.store.access_token_now(digest, now)
    }

    async fn rotate(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &Decide<'_>,
    ) -> StoreResult<RotateOutcome> {
        self.store.rotate_now(presented, client_id, now, decide)
    }

    async fn revoke_family(&self, family: FamilyId) -> StoreResult<Option<u64>> {
        self.store.revoke_family_now(family)
    }

    fn tokens(&self) -> &dyn TokenStore {
        self.tokens
    }
}

/// Runs a filter's future over an [`Immediate`] backend to its end, in one poll. It never
/// waits: every store future it awaits is done at its first poll. Were it to wait anyway (a
/// bug), the request gets a 500, not a hang.
pub fn run_now<T>(f: impl Future<Output = Result<T, FilterError>>) -> Result<T, FilterError> {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => Err(FilterError::Internal(
            "a filter over stores that answer immediately waited".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_future_that_waits_is_an_internal_error_not_a_hang() {
        let done = run_now(async { Ok::<_, FilterError>(7) });
        assert_eq!(done.unwrap(), 7);
        let waits = run_now(async {
            std::future::pending::<()>().await;
            Ok::<_, FilterError>(7)
        });
        assert!(matches!(waits, Err(FilterError::Internal(_))));
    }
}
