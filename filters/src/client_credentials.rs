//! `client_credentials` (placeholder until the refresh issue).
use crate::registry::{BuildContext, BuildError};
use crate::SharedFilter;

pub fn build(_value: serde_yaml::Value, _cx: &BuildContext) -> Result<SharedFilter, BuildError> {
    Err(BuildError::at("", "client_credentials is not built yet"))
}
