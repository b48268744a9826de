//! `gateway clients ...`: the client application registry of a policy folder.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use store::clients::{ClientApplication, SharedRegistry, generate_client_id, generate_secret};
use store::{Digest, StoreConfig};

use crate::config::{self, ApplicationsConfig};

/// Opens the registry that the policy folder `dir` names in `applications:`.
pub async fn open(dir: &Path) -> anyhow::Result<SharedRegistry> {
    let set =
        config::load_dir(dir).map_err(|e| anyhow::anyhow!("the policy set is invalid:\n{e}"))?;
    let Some((applications, _)) = &set.applications else {
        bail!(
            "{} has no `applications:` setting: there is no client registry to manage",
            dir.display()
        );
    };
    Ok(match applications {
        ApplicationsConfig::File { path } => {
            let path = dir.join(path);
            Arc::new(
                store::clients::file::FileRegistry::open(&path)
                    .with_context(|| format!("{}", path.display()))?,
            )
        }
        ApplicationsConfig::Sql { store } => {
            let Some(StoreConfig::Sql(c)) = set.stores.get(store) else {
                bail!("applications.store {store:?} is not a SQL store of this policy set");
            };
            Arc::new(
                store::sql::SqlStore::connect(c)
                    .await
                    .with_context(|| format!("store {store:?}"))?,
            )
        }
    })
}

/// A new application and its secret, which is shown once and never stored.
pub struct Added {
    pub app: ClientApplication,
    pub secret: String,
}

pub async fn add(
    registry: &SharedRegistry,
    name: &str,
    scopes: &str,
    grants: &str,
) -> anyhow::Result<Added> {
    if name.trim().is_empty() {
        bail!("--name must not be empty");
    }
    let scopes: Vec<String> = scopes.split_whitespace().map(str::to_owned).collect();
    let grant_types: Vec<String> = grants
        .split([',', ' '])
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    for g in &grant_types {
        if !KNOWN_GRANTS.contains(&g.as_str()) {
            bail!(
                "unknown grant type {g:?} (known: {})",
                KNOWN_GRANTS.join(", ")
            );
        }
    }
    if grant_types.is_empty() {
        bail!(
            "--grants must name at least one grant type (known: {})",
            KNOWN_GRANTS.join(", ")
        );
    }
    let secret = generate_secret();
    let app = ClientApplication {
        client_id: generate_client_id(),
        name: name.to_owned(),
        secret_digest: Digest::of(&secret),
        enabled: true,
        scopes,
        grant_types,
        created_at: store::now(),
    };
    registry.add(app.clone()).await?;
    Ok(Added { app, secret })
}

/// Replaces the secret of `client_id`; the new one is returned once.
pub async fn rotate_secret(registry: &SharedRegistry, client_id: &str) -> anyhow::Result<String> {
    let secret = generate_secret();
    registry.set_secret(client_id, Digest::of(&secret)).await?;
    Ok(secret)
}

pub const KNOWN_GRANTS: &[&str] = &["refresh_token", "client_credentials"];
