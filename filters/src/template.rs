//! `${attribute}` templates in YAML strings (response bodies, header values, token metadata).
//!
//! Parsed once at build time into literal and attribute parts. `$${` writes a literal `${`.
//! An attribute that is not set renders as the empty string. `${name|json}` escapes the value
//! for the inside of a JSON string (quotes, backslashes, control characters), so request data
//! cannot break out of a JSON body. (Upper-case `${NAME}` references
//! to environment variables were already expanded when the policy was loaded.)

use std::sync::Arc;

use crate::Exchange;
use crate::attributes::Text;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(Arc<str>),
    Attribute { name: String, json: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        while let Some(i) = rest.find('$') {
            literal.push_str(&rest[..i]);
            let after = &rest[i..];
            if let Some(tail) = after.strip_prefix("$${") {
                literal.push_str("${");
                rest = tail;
            } else if let Some(tail) = after.strip_prefix("${") {
                let end = tail
                    .find('}')
                    .ok_or_else(|| format!("unclosed `${{` in {source:?}"))?;
                let inner = tail[..end].trim();
                let (name, json) = match inner.split_once('|') {
                    None => (inner, false),
                    Some((n, "json")) => (n.trim(), true),
                    Some((_, other)) => {
                        return Err(format!("unknown template filter `|{other}` (known: |json)"));
                    }
                };
                if name.is_empty() {
                    return Err("empty `${}` in template".into());
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal).into()));
                }
                parts.push(Part::Attribute {
                    name: name.to_owned(),
                    json,
                });
                rest = &tail[end + 1..];
            } else {
                literal.push('$');
                rest = &after[1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal.into()));
        }
        Ok(Template { parts })
    }

    /// True when the template has no attribute reference (the render is a constant).
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// The rendered text; a constant template shares its text instead of copying it.
    pub fn render_text(&self, ex: &Exchange) -> Text {
        match self.parts.as_slice() {
            [] => Text::Static(""),
            [Part::Literal(s)] => Text::Shared(s.clone()),
            _ => Text::Owned(self.render(ex)),
        }
    }

    pub fn render(&self, ex: &Exchange) -> String {
        match self.parts.as_slice() {
            [] => String::new(),
            [Part::Literal(s)] => s.to_string(),
            parts => {
                let mut out = String::new();
                for p in parts {
                    match p {
                        Part::Literal(s) => out.push_str(s),
                        Part::Attribute { name, json } => {
                            if let Some(v) = ex.get(name) {
                                if *json {
                                    push_json_escaped(&mut out, &v);
                                } else {
                                    out.push_str(&v);
                                }
                            }
                        }
                    }
                }
                out
            }
        }
    }
}

fn push_json_escaped(out: &mut String, v: &str) {
    // serde_json writes a quoted string; keep what is between the quotes.
    let quoted = serde_json::Value::from(v).to_string();
    out.push_str(&quoted[1..quoted.len() - 1]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ex() -> Exchange {
        let (parts, ()) = http::Request::builder()
            .uri("/p?q=1")
            .body(())
            .unwrap()
            .into_parts();
        let mut ex = Exchange::new(parts, Bytes::new());
        ex.set("user", "ada");
        ex
    }

    #[test]
    fn renders_attributes_and_literals() {
        let t = Template::parse("hello ${user} at ${http.path}; ${none}|$${raw} $5").unwrap();
        assert_eq!(t.render(&ex()), "hello ada at /p; |${raw} $5");
        assert!(!t.is_constant());
        assert!(Template::parse("plain").unwrap().is_constant());
    }

    #[test]
    fn json_filter_escapes_request_data() {
        let mut e = ex();
        e.set("evil", "a\"b\\c\n</x>");
        let t = Template::parse(r#"{"v":"${evil|json}"}"#).unwrap();
        let out = t.render(&e);
        let v: serde_json::Value = serde_json::from_str(&out).expect("still valid JSON");
        assert_eq!(v["v"], "a\"b\\c\n</x>");
        assert!(Template::parse("${a|yaml}").is_err());
    }

    #[test]
    fn rejects_unclosed_and_empty_references() {
        assert!(Template::parse("a ${b").is_err());
        assert!(Template::parse("a ${ }").is_err());
    }
}
