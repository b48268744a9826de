//! `gateway clients ...`: the client application registry of a policy folder.

use std::path::Path;

use anyhow::bail;
use store::Digest;
use store::clients::{ClientApplication, SharedRegistry, generate_client_id, generate_secret};

use crate::config;

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
    crate::runtime::open_registry(&set, applications, crate::runtime::Mode::Run)
        .await
        .map_err(anyhow::Error::msg)
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
