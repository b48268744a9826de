//! `refresh_access_token` (placeholder until the refresh issue).
use crate::registry::{BuildContext, BuildError};
use crate::SharedFilter;

pub fn build(_value: serde_yaml::Value, _cx: &BuildContext) -> Result<SharedFilter, BuildError> {
    Err(BuildError::at("", "refresh_access_token is not built yet"))
}
