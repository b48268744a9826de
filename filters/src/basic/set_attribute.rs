//! `set_attribute`: sets a named attribute from a template. Always passes.

use std::sync::Arc;

use serde::Deserialize;

use crate::attributes::intern;
use crate::registry::{BuildContext, BuildError, parse};
use crate::template::Template;
use crate::{Exchange, FilterError, Flow, SharedFilter, SyncFilter};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub attribute: String,
    pub value: String,
}

struct SetAttribute {
    /// Interned: every request that sets it carries the same text (no copy, no count).
    attribute: &'static str,
    value: Template,
}

pub fn build(value: serde_yaml::Value, _cx: &BuildContext) -> Result<SharedFilter, BuildError> {
    let c: Config = parse(value)?;
    if c.attribute.trim().is_empty() {
        return Err(BuildError::at(
            "attribute",
            "attribute name must not be empty",
        ));
    }
    if c.attribute.starts_with("http.") {
        return Err(BuildError::at(
            "attribute",
            "`http.*` attributes are read from the request and cannot be set",
        ));
    }
    let value = Template::parse(&c.value)
        .map_err(|m| BuildError::at("value", m))?
        .intern_constant();
    Ok(Arc::new(SetAttribute {
        attribute: intern(&c.attribute),
        value,
    }))
}

impl SyncFilter for SetAttribute {
    fn run(&self, ex: &mut Exchange) -> Result<Flow, FilterError> {
        let v = self.value.render_text(ex);
        ex.set(self.attribute, v);
        Ok(Flow::Pass)
    }
}
