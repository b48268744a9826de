//! `${attribute}` templates in YAML strings (response bodies, header values, token metadata).
//!
//! Parsed once at build time into literal and attribute parts. `$${` writes a literal `${`.
//! An attribute that is not set renders as the empty string. (Upper-case `${NAME}` references
//! to environment variables were already expanded when the policy was loaded.)

use crate::Exchange;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Attribute(String),
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
                let name = tail[..end].trim();
                if name.is_empty() {
                    return Err("empty `${}` in template".into());
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(Part::Attribute(name.to_owned()));
                rest = &tail[end + 1..];
            } else {
                literal.push('$');
                rest = &after[1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template { parts })
    }

    /// True when the template has no attribute reference (the render is a constant).
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    pub fn render(&self, ex: &Exchange) -> String {
        match self.parts.as_slice() {
            [] => String::new(),
            [Part::Literal(s)] => s.clone(),
            parts => {
                let mut out = String::new();
                for p in parts {
                    match p {
                        Part::Literal(s) => out.push_str(s),
                        Part::Attribute(a) => {
                            if let Some(v) = ex.get(a) {
                                out.push_str(&v);
                            }
                        }
                    }
                }
                out
            }
        }
    }
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
    fn rejects_unclosed_and_empty_references() {
        assert!(Template::parse("a ${b").is_err());
        assert!(Template::parse("a ${ }").is_err());
    }
}
