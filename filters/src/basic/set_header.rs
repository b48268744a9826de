//! `set_header`: sets a header on the response being built (or on the request, for the
//! filters after it). Always passes; a value that renders to an invalid header is skipped
//! with a warning rather than breaking the request.

use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::registry::{BuildContext, BuildError, parse};
use crate::template::Template;
use crate::{Exchange, FilterError, Flow, SharedFilter, SyncFilter};

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    #[default]
    Response,
    Request,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The header name (`name` is the node's own name).
    pub header: String,
    pub value: String,
    #[serde(default)]
    pub target: Target,
    /// Add another value instead of replacing the existing ones.
    #[serde(default)]
    pub append: bool,
}

struct SetHeader {
    name: HeaderName,
    value: Template,
    constant: Option<HeaderValue>,
    target: Target,
    append: bool,
}

pub fn build(value: serde_yaml::Value, _cx: &BuildContext) -> Result<SharedFilter, BuildError> {
    let c: Config = parse(value)?;
    let name = HeaderName::from_bytes(c.header.as_bytes()).map_err(|_| {
        BuildError::at(
            "header",
            format!("{:?} is not a valid header name", c.header),
        )
    })?;
    let value = Template::parse(&c.value).map_err(|m| BuildError::at("value", m))?;
    let constant = if value.is_constant() {
        Some(
            HeaderValue::from_str(&c.value.replace("$${", "${")).map_err(|_| {
                BuildError::at("value", "not a valid header value (control characters?)")
            })?,
        )
    } else {
        None
    };
    Ok(Arc::new(SetHeader {
        name,
        value,
        constant,
        target: c.target,
        append: c.append,
    }))
}

impl SyncFilter for SetHeader {
    fn run(&self, ex: &mut Exchange) -> Result<Flow, FilterError> {
        let value = match &self.constant {
            Some(v) => v.clone(),
            None => match HeaderValue::from_str(&self.value.render(ex)) {
                Ok(v) => v,
                Err(_) => {
                    tracing::warn!(header = %self.name, "rendered header value is not valid; header not set");
                    return Ok(Flow::Pass);
                }
            },
        };
        let headers = match self.target {
            Target::Response => &mut ex.response.headers,
            Target::Request => &mut ex.request.headers,
        };
        if self.append {
            headers.append(self.name.clone(), value);
        } else {
            headers.insert(self.name.clone(), value);
        }
        Ok(Flow::Pass)
    }
}
