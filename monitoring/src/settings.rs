//! The seeds' per-filter "Monitoring settings", as YAML sees them.

use serde::{Deserialize, Serialize};

/// Default attribute that identifies the client (the seeds' default).
pub const DEFAULT_CLIENT_ATTRIBUTE: &str = "authentication.subject.id";

/// The `monitoring:` block of a filter node:
///
/// ```yaml
/// monitoring:
///   enabled: true                                # Enable monitoring
///   client_attribute: authentication.subject.id  # Which attribute identifies the client
///   composite_context: false                     # Composite Context
/// ```
///
/// `enabled: false` records nothing for the node. The value of `client_attribute` is only ever
/// used through [`crate::Monitoring::client`], so an unregistered value is counted as `other`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringSettings {
    pub enabled: bool,
    pub client_attribute: String,
    pub composite_context: bool,
}

impl Default for MonitoringSettings {
    fn default() -> Self {
        MonitoringSettings {
            enabled: true,
            client_attribute: DEFAULT_CLIENT_ATTRIBUTE.to_owned(),
            composite_context: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let s: MonitoringSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(s, MonitoringSettings::default());
        assert!(s.enabled);
        assert_eq!(s.client_attribute, "authentication.subject.id");
        assert!(!s.composite_context);
        assert!(serde_json::from_str::<MonitoringSettings>(r#"{"enable": true}"#).is_err());
    }
}
