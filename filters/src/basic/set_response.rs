//! `set_response`: answers the request: status, headers and a body with `${attribute}`
//! templates. Ends the chain.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;

use crate::registry::{BuildContext, BuildError, parse};
use crate::template::Template;
use crate::{Exchange, FilterError, Flow, SharedFilter, SyncFilter};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "ok")]
    pub status: u16,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub content_type: Option<String>,
}

fn ok() -> u16 {
    200
}

struct SetResponse {
    status: StatusCode,
    headers: Vec<(HeaderName, Template)>,
    body: Template,
    constant_body: Option<Bytes>,
}

pub fn build(value: serde_yaml::Value, _cx: &BuildContext) -> Result<SharedFilter, BuildError> {
    let value = headers_as_pairs(value);
    let c: Config = parse(value)?;
    let status = StatusCode::from_u16(c.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| {
            BuildError::at(
                "status",
                format!("{} is not an HTTP status (200..599)", c.status),
            )
        })?;
    let mut headers = Vec::new();
    if let Some(ct) = &c.content_type {
        headers.push(("content-type".to_owned(), ct.clone()));
    }
    headers.extend(c.headers);
    let headers = headers
        .into_iter()
        .map(|(n, v)| {
            let name = HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| BuildError::at(&format!("headers.{n}"), "not a valid header name"))?;
            let t = Template::parse(&v).map_err(|m| BuildError::at(&format!("headers.{n}"), m))?;
            Ok((name, t))
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    let body = Template::parse(&c.body)
        .map_err(|m| BuildError::at("body", m))?
        .intern_constant();
    let constant_body = body.constant_bytes();
    Ok(Arc::new(SetResponse {
        status,
        headers,
        body,
        constant_body,
    }))
}

/// `headers:` is written as a map in YAML; keep its order by turning it into pairs.
fn headers_as_pairs(mut value: serde_yaml::Value) -> serde_yaml::Value {
    if let Some(map) = value.as_mapping_mut()
        && let Some(serde_yaml::Value::Mapping(h)) = map.get_mut("headers")
    {
        let pairs: Vec<serde_yaml::Value> = h
            .iter()
            .map(|(k, v)| serde_yaml::Value::Sequence(vec![k.clone(), v.clone()]))
            .collect();
        map.insert("headers".into(), serde_yaml::Value::Sequence(pairs));
    }
    value
}

impl SyncFilter for SetResponse {
    fn run(&self, ex: &mut Exchange) -> Result<Flow, FilterError> {
        let body = match &self.constant_body {
            Some(b) => b.clone(),
            None => Bytes::from(self.body.render(ex)),
        };
        let mut resp = http::Response::new(body);
        *resp.status_mut() = self.status;
        // Headers set earlier in the chain (set_header) come first; ours win on conflict.
        *resp.headers_mut() = std::mem::take(&mut ex.response.headers);
        for (name, t) in &self.headers {
            match HeaderValue::from_str(&t.render(ex)) {
                Ok(v) => {
                    resp.headers_mut().insert(name.clone(), v);
                }
                Err(_) => {
                    tracing::warn!(header = %name, "rendered header value is not valid; header not set")
                }
            }
        }
        Ok(Flow::Respond(resp))
    }
}
