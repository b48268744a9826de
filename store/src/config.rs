//! Store configuration as written in YAML (`stores:` in the gateway settings), and the one
//! place that turns it into a running store.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::{SharedStore, StoreError};

/// `stores: { NAME: { type: memory | sql, ... } }`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StoreConfig {
    /// In memory (sharded hash table): fast, lost on restart, private to one process.
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

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// `sqlite://data/tokens.db` or `postgres://user@host/db`. `${NAME}` is taken from the
    /// environment when the store connects ([`expand_env`]), so passwords stay out of files.
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
    /// PostgreSQL only: the schema that holds the tables (created if missing, then used as the
    /// connections' `search_path`), so several gateways or test runs can share one database
    /// without sharing tokens. `None` uses the server's default search path.
    #[serde(default)]
    pub schema: Option<String>,
}

impl SqlConfig {
    /// A config with the defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        SqlConfig {
            url: url.into(),
            max_connections: default_pool(),
            connect_timeout_secs: default_connect_timeout(),
            acquire_timeout_secs: default_acquire_timeout(),
            purge_interval_secs: default_purge(),
            schema: None,
        }
    }
}

// The URL may carry a password: Debug (and so every log line built from the config) shows it
// with the password masked.
impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("acquire_timeout_secs", &self.acquire_timeout_secs)
            .field("purge_interval_secs", &self.purge_interval_secs)
            .field("schema", &self.schema)
            .finish()
    }
}

/// The URL with any password (`user:password@`, `?password=`) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let masked: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{head}{}", masked.join("&"));
    }
    out
}

/// Expands `${NAME}` from the environment, so that passwords stay out of configuration files.
/// An unset variable is an error naming the variable (never its value).
pub fn expand_env(input: &str) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${ in store URL".to_owned())?;
        let name = &after[..end];
        if name.is_empty() {
            return Err("empty ${} in store URL".to_owned());
        }
        let value =
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact_url("postgres://gw:s3cret@db:5432/gw?sslmode=require"),
            "postgres://gw:***@db:5432/gw?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://gw@db/gw?password=s3cret&x=1"),
            "postgres://gw@db/gw?password=***&x=1"
        );
        assert_eq!(
            redact_url("sqlite://data/tokens.db"),
            "sqlite://data/tokens.db"
        );
        let debug = format!("{:?}", SqlConfig::new("postgres://gw:s3cret@db/gw"));
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn env_is_expanded() {
        // cargo sets CARGO_PKG_NAME for the test process; setting a variable would need unsafe.
        assert_eq!(
            expand_env("postgres://gw:${CARGO_PKG_NAME}@db/gw").as_deref(),
            Ok("postgres://gw:store@db/gw")
        );
        assert_eq!(
            expand_env("postgres://gw:${STORE_CONFIG_TEST_PW_UNSET}@db/gw"),
            Err("environment variable STORE_CONFIG_TEST_PW_UNSET is not set".to_owned())
        );
        assert_eq!(expand_env("sqlite://a.db").as_deref(), Ok("sqlite://a.db"));
        assert!(expand_env("x${").is_err());
    }

    #[test]
    fn yaml_keys() {
        let c: StoreConfig =
            serde_yaml::from_str("{ type: sql, url: \"postgres://x/y\", schema: gw1 }").unwrap();
        match c {
            StoreConfig::Sql(s) => {
                assert_eq!(s.schema.as_deref(), Some("gw1"));
                assert_eq!(s.max_connections, 8);
            }
            other => panic!("{other:?}"),
        }
        assert!(serde_yaml::from_str::<StoreConfig>("{ type: sql, url: x, scheme: a }").is_err());
    }
}
