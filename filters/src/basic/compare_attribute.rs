//! `compare_attribute`: passes when an attribute equals a value, is one of several, or
//! matches a regular expression; fails otherwise (and when the attribute is not set, which
//! includes a query or form parameter given more than once). Its own failure response is 403;
//! policies usually give it an `on_failure` edge instead.

use std::sync::Arc;

use http::StatusCode;
use regex::Regex;
use serde::Deserialize;

use crate::registry::{BuildContext, BuildError, parse};
use crate::{Exchange, Failure, FilterError, Flow, SharedFilter, SyncFilter, json_response};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub attribute: String,
    #[serde(default)]
    pub equals: Option<String>,
    #[serde(default)]
    pub one_of: Option<Vec<String>>,
    #[serde(default)]
    pub matches: Option<String>,
    #[serde(default)]
    pub case_insensitive: bool,
}

enum Test {
    Equals(String),
    OneOf(Vec<String>),
    Matches(Regex),
}

struct CompareAttribute {
    attribute: String,
    test: Test,
    case_insensitive: bool,
}

pub fn build(value: serde_yaml::Value, _cx: &BuildContext) -> Result<SharedFilter, BuildError> {
    let c: Config = parse(value)?;
    let test = match (c.equals, c.one_of, c.matches) {
        (Some(v), None, None) => Test::Equals(v),
        (None, Some(vs), None) if !vs.is_empty() => Test::OneOf(vs),
        (None, Some(_), None) => {
            return Err(BuildError::at("one_of", "must list at least one value"));
        }
        (None, None, Some(re)) => {
            let re = regex::RegexBuilder::new(&re)
                .case_insensitive(c.case_insensitive)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| {
                    BuildError::at("matches", format!("invalid regular expression: {e}"))
                })?;
            Test::Matches(re)
        }
        _ => {
            return Err(BuildError::at(
                "",
                "give exactly one of `equals`, `one_of` or `matches`",
            ));
        }
    };
    Ok(Arc::new(CompareAttribute {
        attribute: c.attribute,
        test,
        case_insensitive: c.case_insensitive,
    }))
}

impl CompareAttribute {
    fn same(&self, a: &str, b: &str) -> bool {
        if self.case_insensitive {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    }
}

impl SyncFilter for CompareAttribute {
    fn run(&self, ex: &mut Exchange) -> Result<Flow, FilterError> {
        let ok = match ex.get(&self.attribute) {
            None => false,
            Some(v) => match &self.test {
                Test::Equals(e) => self.same(&v, e),
                Test::OneOf(es) => es.iter().any(|e| self.same(&v, e)),
                Test::Matches(re) => re.is_match(&v),
            },
        };
        if ok {
            Ok(Flow::Pass)
        } else {
            Ok(Flow::Fail(Failure::new(
                format!("{} did not match", self.attribute),
                json_response(
                    StatusCode::FORBIDDEN,
                    &serde_json::json!({"error": "forbidden"}),
                ),
            )))
        }
    }
}
