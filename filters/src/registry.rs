//! Every filter kind, listed once, and what building one needs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use monitoring::Monitoring;
use serde::de::DeserializeOwned;
use store::SharedStore;
use store::clients::SharedRegistry;

use crate::SharedFilter;

/// One filter kind: its YAML `type` name and its builder.
pub struct Kind {
    pub name: &'static str,
    pub build: fn(serde_yaml::Value, &BuildContext) -> Result<SharedFilter, BuildError>,
}

/// Every kind the engine knows. Adding a kind: one line here.
pub static KINDS: &[Kind] = &[
    Kind {
        name: "compare_attribute",
        build: crate::basic::compare_attribute::build,
    },
    Kind {
        name: "set_attribute",
        build: crate::basic::set_attribute::build,
    },
    Kind {
        name: "set_header",
        build: crate::basic::set_header::build,
    },
    Kind {
        name: "set_response",
        build: crate::basic::set_response::build,
    },
    Kind {
        name: "refresh_access_token",
        build: crate::refresh_access_token::build,
    },
    Kind {
        name: "client_credentials",
        build: crate::client_credentials::build,
    },
    Kind {
        name: "validate_access_token",
        build: crate::validate_access_token::build,
    },
];

pub fn find_kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// What a builder may use: the named stores, the client registry, the metrics.
pub struct BuildContext<'a> {
    pub stores: &'a HashMap<String, SharedStore>,
    pub registry: Option<SharedRegistry>,
    pub monitoring: Arc<Monitoring>,
    pub policy: &'a str,
    /// The policy's `monitoring.enabled`: when false, its filters record nothing either
    /// (their token counters and store latencies included).
    pub policy_monitoring: bool,
    pub node: &'a str,
    /// Accepted but worth telling the operator (`gateway check` prints these).
    pub warnings: RefCell<Vec<BuildError>>,
}

impl BuildContext<'_> {
    pub fn warn(&self, path: &str, message: impl Into<String>) {
        self.warnings
            .borrow_mut()
            .push(BuildError::at(path, message));
    }

    pub fn store(&self, path: &str, name: &str) -> Result<SharedStore, BuildError> {
        self.stores.get(name).cloned().ok_or_else(|| {
            let mut known: Vec<&str> = self.stores.keys().map(String::as_str).collect();
            known.sort_unstable();
            BuildError::at(
                path,
                format!("no store named {name:?} (stores: {})", known.join(", ")),
            )
        })
    }

    pub fn registry(&self, path: &str) -> Result<SharedRegistry, BuildError> {
        self.registry.clone().ok_or_else(|| {
            BuildError::at(
                path,
                "this filter needs the client application registry: add `applications:` to the gateway settings",
            )
        })
    }
}

/// A configuration error inside one node, at a path relative to the node (`access_token.store`,
/// empty for the node itself). The engine prefixes the node's own path and finds the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildError {
    pub path: String,
    pub message: String,
}

impl BuildError {
    pub fn at(path: &str, message: impl Into<String>) -> Self {
        BuildError {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

/// Deserialises a node's settings, keeping the path of the first offending key.
pub fn parse<C: DeserializeOwned>(value: serde_yaml::Value) -> Result<C, BuildError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        BuildError {
            path: if path == "." { String::new() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}
