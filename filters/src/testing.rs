//! What the token filters' tests share: the client `app` (secret `s3cret`, scope `read`) in a
//! file registry, a node built over a token store, and a form posted to the token endpoint as
//! `app`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use monitoring::Monitoring;
use store::clients::SharedRegistry;
use store::clients::file::FileRegistry;
use store::memory::MemoryStore;
use store::testing::Pair;
use store::{ClientApplication, ClientRegistry, Digest, SharedStore, TokenStore};

use crate::{BuildContext, BuildError, Exchange, SharedFilter};

/// A filter kind's `build`.
pub type Build = fn(serde_yaml::Value, &BuildContext) -> Result<SharedFilter, BuildError>;

/// The client every test authenticates as, allowed `grant_type` and the scope `read`.
fn app(grant_type: &str) -> ClientApplication {
    ClientApplication {
        client_id: "app".into(),
        name: "app".into(),
        secret_digest: Digest::of("s3cret"),
        enabled: true,
        scopes: vec!["read".into()],
        grant_types: vec![grant_type.into()],
        created_at: 0,
    }
}

/// A file registry (held in memory) holding [`app`].
pub async fn registry_with_app(grant_type: &str) -> Arc<FileRegistry> {
    let registry = Arc::new(FileRegistry::in_memory());
    registry.add(app(grant_type)).await.unwrap();
    registry
}

/// The node `build` makes of `config` over `store` (named `tokens`) and `registry`, and the
/// metrics it records into.
pub fn built(
    build: Build,
    config: &str,
    store: SharedStore,
    registry: Option<SharedRegistry>,
) -> (SharedFilter, Arc<Monitoring>) {
    let stores = HashMap::from([("tokens".to_owned(), store)]);
    let monitoring = Arc::new(Monitoring::new());
    let cx = BuildContext {
        stores: &stores,
        registry,
        monitoring: monitoring.clone(),
        policy: "p",
        policy_monitoring: true,
        node: "node",
        warnings: RefCell::new(Vec::new()),
    };
    let filter = build(serde_yaml::from_str(config).unwrap(), &cx).unwrap();
    (filter, monitoring)
}

/// A memory store holding one issued pair of `store::testing::grant("app")` (scope
/// `read write`, access token for an hour, refresh token for two), and its tokens.
pub async fn memory_with_pair() -> (Arc<MemoryStore>, Pair) {
    let memory = Arc::new(MemoryStore::new(1_000));
    let (issue, pair) = store::testing::new_issue(
        &*memory,
        store::testing::grant("app"),
        store::now(),
        3600,
        7200,
    );
    memory.issue(issue).await.unwrap();
    (memory, pair)
}

/// A form posted to the token endpoint, authenticated as [`app`] with HTTP Basic.
pub fn token_request(form: impl Into<Bytes>) -> Exchange {
    let (parts, ()) = http::Request::post("/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", "Basic YXBwOnMzY3JldA==") // app:s3cret
        .body(())
        .unwrap()
        .into_parts();
    Exchange::new(parts, form.into())
}
