//! A short-lived cache in front of a registry that lives in a database.
//!
//! Without it every token request costs one `SELECT` on the client table, on every replica.
//! With it, a lookup is served from memory for [`CachedRegistry::TTL`] at most, concurrent
//! misses for one id share one query (moka's `try_get_with`), and unknown ids are remembered
//! too, so a flood of made-up client ids reaches the database once per id and second; moka's
//! TinyLFU admission keeps such a flood from pushing the real clients out of the bounded cache.
//! Errors are not cached: the next request asks the database again.
//!
//! Changes made through this registry (the `gateway clients` commands, when they run against
//! the same process) are seen by every lookup that starts after them: a write moves the cache to
//! a new generation, part of every key, so neither a cached row nor a query that was already
//! under way when the write committed can answer a later lookup. Changes made elsewhere (another
//! replica, another process) are seen within the TTL, as the file registry sees its file's
//! changes within a second.
//!
//! The cache is bounded in bytes, not entries: client ids come from requests and can be long.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use moka::future::Cache;

use super::{ClientApplication, ClientRegistry, RegistryError, SharedRegistry};
use crate::Digest;

pub struct CachedRegistry {
    inner: SharedRegistry,
    /// Keyed by (generation, client id); see the module documentation.
    cache: Cache<(u64, String), Option<Arc<ClientApplication>>>,
    generation: AtomicU64,
}

impl CachedRegistry {
    /// How long a lookup is reused.
    pub const TTL: Duration = Duration::from_secs(1);
    /// Bytes held at most, counting each entry as its id plus [`Self::ENTRY_BYTES`].
    pub const CAPACITY_BYTES: u64 = 4 << 20;
    /// What an entry costs besides its id, roughly (the row and moka's bookkeeping).
    pub const ENTRY_BYTES: u32 = 512;

    pub fn new(inner: SharedRegistry) -> Self {
        Self::with_ttl(inner, Self::TTL)
    }

    pub fn with_ttl(inner: SharedRegistry, ttl: Duration) -> Self {
        CachedRegistry {
            inner,
            cache: Cache::builder()
                .max_capacity(Self::CAPACITY_BYTES)
                .weigher(|(_, id): &(u64, String), _| {
                    u32::try_from(id.len())
                        .unwrap_or(u32::MAX)
                        .saturating_add(Self::ENTRY_BYTES)
                })
                .time_to_live(ttl)
                .build(),
            generation: AtomicU64::new(0),
        }
    }

    /// After a write through this registry: later lookups use fresh keys.
    fn moved_on(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl ClientRegistry for CachedRegistry {
    async fn get(&self, client_id: &str) -> Result<Option<Arc<ClientApplication>>, RegistryError> {
        let key = (
            self.generation.load(Ordering::Acquire),
            client_id.to_owned(),
        );
        self.cache
            .try_get_with(key, self.inner.get(client_id))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn list(&self) -> Result<Vec<ClientApplication>, RegistryError> {
        self.inner.list().await
    }

    async fn add(&self, app: ClientApplication) -> Result<(), RegistryError> {
        let r = self.inner.add(app).await;
        self.moved_on();
        r
    }

    async fn set_enabled(&self, client_id: &str, enabled: bool) -> Result<(), RegistryError> {
        let r = self.inner.set_enabled(client_id, enabled).await;
        self.moved_on();
        r
    }

    async fn set_secret(&self, client_id: &str, digest: Digest) -> Result<(), RegistryError> {
        let r = self.inner.set_secret(client_id, digest).await;
        self.moved_on();
        r
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::clients::file::FileRegistry;

    /// The file registry in memory, counting lookups and failing on demand.
    struct Counted {
        inner: FileRegistry,
        gets: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl ClientRegistry for Counted {
        async fn get(&self, id: &str) -> Result<Option<Arc<ClientApplication>>, RegistryError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            // The row is read first and answered late, as by a query: long enough for
            // concurrent callers to pile up behind it, and for a write to commit meanwhile.
            let row = self.inner.get(id).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.down.load(Ordering::SeqCst) {
                return Err(RegistryError::Unavailable("down".into()));
            }
            row
        }
        async fn list(&self) -> Result<Vec<ClientApplication>, RegistryError> {
            self.inner.list().await
        }
        async fn add(&self, app: ClientApplication) -> Result<(), RegistryError> {
            self.inner.add(app).await
        }
        async fn set_enabled(&self, id: &str, enabled: bool) -> Result<(), RegistryError> {
            self.inner.set_enabled(id, enabled).await
        }
        async fn set_secret(&self, id: &str, digest: Digest) -> Result<(), RegistryError> {
            self.inner.set_secret(id, digest).await
        }
    }

    fn app(id: &str) -> ClientApplication {
        ClientApplication {
            client_id: id.into(),
            name: id.into(),
            secret_digest: Digest::of("secret"),
            enabled: true,
            scopes: vec!["read".into()],
            grant_types: vec!["refresh_token".into()],
            created_at: 0,
        }
    }

    /// A counted registry holding one enabled client, `a`.
    async fn with_client_a() -> Arc<Counted> {
        let counted = Arc::new(Counted {
            inner: FileRegistry::in_memory(),
            gets: AtomicUsize::new(0),
            down: Default::default(),
        });
        counted.inner.add(app("a")).await.expect("add");
        counted
    }

    /// Whether `id` is enabled, as the cache answers (`None`: unknown).
    async fn enabled(cached: &CachedRegistry, id: &str) -> Option<bool> {
        cached.get(id).await.expect("lookup").map(|a| a.enabled)
    }

    #[tokio::test]
    async fn lookups_are_shared_expire_and_follow_local_writes() {
        let counted = with_client_a().await;
        let cached = Arc::new(CachedRegistry::with_ttl(
            counted.clone(),
            Duration::from_millis(300),
        ));

        // 20 concurrent misses for one id: one query.
        let lookups = (0..20).map(|_| {
            let c = cached.clone();
            tokio::spawn(async move { c.get("a").await })
        });
        for l in lookups {
            let found = l.await.expect("task").expect("lookup");
            assert!(found.is_some_and(|a| a.enabled));
        }
        assert_eq!(counted.gets.load(Ordering::SeqCst), 1);

        // Unknown ids are remembered too.
        assert!(cached.get("nobody").await.expect("lookup").is_none());
        assert!(cached.get("nobody").await.expect("lookup").is_none());
        assert_eq!(counted.gets.load(Ordering::SeqCst), 2);

        // A change behind the cache's back is seen after the TTL, not before.
        counted
            .inner
            .set_enabled("a", false)
            .await
            .expect("disable");
        assert_eq!(enabled(&cached, "a").await, Some(true));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(enabled(&cached, "a").await, Some(false));

        // A change through the cache is seen at once.
        cached.set_enabled("a", true).await.expect("enable");
        assert_eq!(enabled(&cached, "a").await, Some(true));
        cached.add(app("b")).await.expect("add");
        assert!(cached.get("b").await.expect("lookup").is_some());
    }

    #[tokio::test]
    async fn a_lookup_after_a_local_write_never_gets_an_older_answer() {
        let counted = with_client_a().await;
        let cached = Arc::new(CachedRegistry::new(counted.clone()));
        // A lookup reads the row (enabled) and is still under way when the client is disabled.
        let early = tokio::spawn({
            let c = cached.clone();
            async move { c.get("a").await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        cached.set_enabled("a", false).await.expect("disable");
        let later = cached.get("a").await.expect("lookup").expect("known");
        assert!(
            !later.enabled,
            "a lookup that starts after the write sees it"
        );
        let early = early.await.expect("task").expect("lookup").expect("known");
        assert!(early.enabled, "the lookup under way answered what it read");
        assert!(
            !cached
                .get("a")
                .await
                .expect("lookup")
                .expect("known")
                .enabled
        );
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let counted = with_client_a().await;
        let cached = CachedRegistry::new(counted.clone());
        counted.down.store(true, Ordering::SeqCst);
        assert!(matches!(
            cached.get("a").await,
            Err(RegistryError::Unavailable(_))
        ));
        counted.down.store(false, Ordering::SeqCst);
        assert!(cached.get("a").await.expect("lookup").is_some());
        assert_eq!(counted.gets.load(Ordering::SeqCst), 2);
    }
}
