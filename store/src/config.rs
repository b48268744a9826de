//! Store configuration as written in YAML (`stores:` in the gateway settings), and the one
//! place that turns it into a running store.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::{SharedStore, StoreError};

/// `stores: { NAME: { type: memory | sql, ... } }`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StoreConfig {
    /// moka in memory: fast, lost on restart, private to one process.
    Memory(MemoryConfig),
    /// sqlx: `sqlite://path` (durable, one machine) or `postgres://...` (many replicas).
    Sql(SqlConfig),
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Capacity bound, in tokens (access and refresh entries together).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// The seeds' "Purge expired tokens every" (seconds).
    #[serde(default = "default_purge")]
    pub purge_interval_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// `sqlite://data/tokens.db` or `postgres://user@host/db`; `${ENV}` is expanded at load.
    pub url: String,
    #[serde(default = "default_pool")]
    pub max_connections: u32,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// How long a request waits for a pooled connection before the store reports unavailable.
    #[serde(default = "default_acquire_timeout")]
    pub acquire_timeout_secs: u64,
    #[serde(default = "default_purge")]
    pub purge_interval_secs: u64,
}

fn default_max_tokens() -> u64 {
    1_000_000
}
fn default_purge() -> u64 {
    60
}
fn default_pool() -> u32 {
    8
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_acquire_timeout() -> u64 {
    2
}

impl StoreConfig {
    pub fn purge_interval(&self) -> Duration {
        Duration::from_secs(match self {
            StoreConfig::Memory(m) => m.purge_interval_secs,
            StoreConfig::Sql(s) => s.purge_interval_secs,
        })
    }
}

/// Opens (and for SQL, migrates) the store a config describes.
pub async fn open_store(config: &StoreConfig) -> Result<SharedStore, StoreError> {
    match config {
        StoreConfig::Memory(m) => Ok(Arc::new(crate::memory::MemoryStore::new(m.max_tokens))),
        StoreConfig::Sql(s) => Ok(Arc::new(crate::sql::SqlStore::connect(s).await?)),
    }
}
