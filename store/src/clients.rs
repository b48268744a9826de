//! The client application registry (the seeds' `ClientApplicationRegistry` key property store).
//!
//! Each application has an id, the SHA-256 digest of its secret (never the secret), a name, an
//! enabled flag, its registered scopes and the grant types it may use. Two backends: a YAML file
//! (the default; [`file::FileRegistry`]) and a table in a SQL store ([`crate::sql::SqlStore`]).

pub mod cached;
pub mod file;

use std::sync::Arc;

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::{Digest, UnixTime};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientApplication {
    pub client_id: String,
    pub name: String,
    /// SHA-256 of the secret, hex-encoded in files and stored as bytes in SQL.
    #[serde(with = "digest_hex")]
    pub secret_digest: Digest,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub grant_types: Vec<String>,
    #[serde(default)]
    pub created_at: UnixTime,
}

fn yes() -> bool {
    true
}

impl ClientApplication {
    /// Compares the presented secret with the stored digest in constant time. Both sides are
    /// fixed-length digests, so neither the length nor the content of the secret leaks.
    pub fn verify_secret(&self, presented: &str) -> bool {
        Digest::of(presented).0.ct_eq(&self.secret_digest.0).into()
    }

    pub fn allows_grant(&self, grant_type: &str) -> bool {
        self.grant_types.iter().any(|g| g == grant_type)
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// A new client id: 24 alphanumeric characters (not secret, only unique).
pub fn generate_client_id() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

/// A new client secret: 48 alphanumeric characters from the OS-seeded CSPRNG, that is
/// 48 × log2(62) ≈ 285 bits, above the 256 bits the registry promises.
pub fn generate_secret() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 48)
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("client registry unavailable: {0}")]
    Unavailable(String),
    #[error("client registry: {0}")]
    Invalid(String),
    #[error("no client application with id {0:?}")]
    NotFound(String),
}

#[async_trait]
pub trait ClientRegistry: Send + Sync + 'static {
    /// Looks an application up by id. Sees changes made by `gateway clients` without a restart.
    async fn get(&self, client_id: &str) -> Result<Option<Arc<ClientApplication>>, RegistryError>;
    async fn list(&self) -> Result<Vec<ClientApplication>, RegistryError>;
    async fn add(&self, app: ClientApplication) -> Result<(), RegistryError>;
    async fn set_enabled(&self, client_id: &str, enabled: bool) -> Result<(), RegistryError>;
    async fn set_secret(&self, client_id: &str, digest: Digest) -> Result<(), RegistryError>;

    /// The same lookup without a future, when the registry never waits (the file registry,
    /// held in memory). `None` (the default): lookups may wait on a database. A registry that
    /// wraps another (the cache) keeps `None`: passing the inner one's through would bypass it.
    fn immediate(&self) -> Option<&dyn ImmediateRegistry> {
        None
    }
}

/// [`ClientRegistry::get`] without a future, for a registry that never waits.
pub trait ImmediateRegistry: Send + Sync {
    fn get_now(&self, client_id: &str) -> Result<Option<Arc<ClientApplication>>, RegistryError>;
}

pub type SharedRegistry = Arc<dyn ClientRegistry>;

mod digest_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::Digest;

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("sha256:{}", d.to_hex()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        let hex_part = s.strip_prefix("sha256:").unwrap_or(&s);
        hex::decode(hex_part)
            .ok()
            .and_then(|b| Digest::from_slice(&b))
            .ok_or_else(|| serde::de::Error::custom("expected sha256:<64 hex digits>"))
    }
}
