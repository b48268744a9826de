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
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let message = name_the_choices::<C>(&value, &path, e.into_inner().to_string());
        BuildError {
            path: if path == "." { String::new() } else { path },
            message,
        }
    })
}

/// serde_yaml's words for a setting that takes one of a few names (an enum) given a value that
/// is not a string (`client_credentials_in: true`, a store's `type: 1`): they name no choice.
const NOT_A_NAME: [&str; 2] = [
    "expected a Value::Tagged enum",
    "expected variant identifier",
];

/// `message` (the error of deserialising `value` as `C`, at `path`) with the names an enum
/// setting takes in place of serde_yaml's `expected a Value::Tagged enum` or `expected variant
/// identifier`. To learn them, `value` is deserialised once more with a string that no enum
/// takes at `path`, for serde's "unknown variant ..., expected `a` or `b`".
fn name_the_choices<C: DeserializeOwned>(
    value: &serde_yaml::Value,
    path: &str,
    message: String,
) -> String {
    let Some(vague) = NOT_A_NAME.iter().find(|v| message.contains(*v)) else {
        return message;
    };
    match enum_names::<C>(value, path) {
        Some(choices) => message.replace(vague, &format!("expected {choices}")),
        None => message,
    }
}

fn enum_names<C: DeserializeOwned>(value: &serde_yaml::Value, path: &str) -> Option<String> {
    let mut probe = value.clone();
    let mut at = &mut probe;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            at = at.get_mut(name)?;
        }
        for i in indexes.split(['[', ']']).filter(|i| !i.is_empty()) {
            at = at.get_mut(i.parse::<usize>().ok()?)?;
        }
    }
    *at = serde_yaml::Value::String("\u{1}".to_owned());
    let again = serde_path_to_error::deserialize::<_, C>(probe).err()?;
    let again = again.into_inner().to_string();
    // "unknown variant ``, expected `a` or `b`" or "..., expected one of `a`, `b`, `c`".
    let (_, choices) = again
        .strip_prefix("unknown variant ")?
        .split_once(", expected ")?;
    Some(choices.to_owned())
}
