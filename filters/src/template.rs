//! `${attribute}` templates in YAML strings (response bodies, header values, token metadata).
//!
//! Parsed once at build time into literal and attribute parts. `$${` writes a literal `${`.
//! An attribute that is not set renders as the empty string. `${name|json}` escapes the value
//! for the inside of a JSON string (quotes, backslashes, control characters), so request data
//! cannot break out of a JSON body. (Upper-case `${NAME}` references
//! to environment variables were already expanded when the policy was loaded.)

use std::sync::Arc;

use bytes::Bytes;

use crate::Exchange;
use crate::attributes::{Text, intern};

/// A constant up to this many bytes is interned by [`Template::intern_constant`], so that a
/// constant value set as an attribute, or a constant body, is handed over on every request
/// without touching a reference count (two locked instructions per use). Interned text lives
/// as long as the process: a reload that changes such a constant keeps the old one, at most
/// this size for each distinct constant ever configured. Other literals (header values, which
/// may hold a credential, and parts of templates that refer to attributes) are shared and
/// counted, and go with the policy that holds them.
const INTERNED_LITERAL_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(Literal),
    Attribute { name: String, json: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Literal {
    Interned(&'static str),
    Shared(Arc<str>),
}

impl Literal {
    fn as_str(&self) -> &str {
        match self {
            Literal::Interned(s) => s,
            Literal::Shared(s) => s,
        }
    }
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
                    parts.push(Part::Literal(Literal::Shared(
                        std::mem::take(&mut literal).into(),
                    )));
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
            parts.push(Part::Literal(Literal::Shared(literal.into())));
        }
        Ok(Template { parts })
    }

    /// True when the template has no attribute reference (the render is a constant).
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// The same template, its text interned if it is a constant of at most
    /// [`INTERNED_LITERAL_MAX`] bytes: for the values a filter hands out on every request.
    pub fn intern_constant(mut self) -> Self {
        if let [Part::Literal(lit @ Literal::Shared(_))] = self.parts.as_mut_slice()
            && lit.as_str().len() <= INTERNED_LITERAL_MAX
        {
            *lit = Literal::Interned(intern(lit.as_str()));
        }
        self
    }

    /// A constant template's bytes (`None` when it refers to an attribute). A short one is
    /// static: a response body cloned from it per request counts no reference.
    pub fn constant_bytes(&self) -> Option<Bytes> {
        match self.parts.as_slice() {
            [] => Some(Bytes::new()),
            [Part::Literal(Literal::Interned(s))] => Some(Bytes::from_static(s.as_bytes())),
            [Part::Literal(Literal::Shared(s))] => Some(Bytes::copy_from_slice(s.as_bytes())),
            _ => None,
        }
    }

    /// The rendered text; a constant template shares its text instead of copying it.
    pub fn render_text(&self, ex: &Exchange) -> Text {
        match self.parts.as_slice() {
            [] => Text::Static(""),
            [Part::Literal(Literal::Interned(s))] => Text::Static(s),
            [Part::Literal(Literal::Shared(s))] => Text::Shared(s.clone()),
            _ => Text::Owned(self.render(ex)),
        }
    }

    pub fn render(&self, ex: &Exchange) -> String {
        match self.parts.as_slice() {
            [] => String::new(),
            [Part::Literal(s)] => s.as_str().to_owned(),
            parts => {
                let mut out = String::new();
                for p in parts {
                    match p {
                        Part::Literal(s) => out.push_str(s.as_str()),
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
    fn constant_templates_hand_out_their_text_without_counting_it() {
        let e = ex();
        // Short literals are interned: two templates of the same text give the same static
        // text and the same static bytes, with `$${` written as `${`.
        let (a, b) = (
            Template::parse("v-$${1}").unwrap().intern_constant(),
            Template::parse("v-$${1}").unwrap().intern_constant(),
        );
        let (ta, tb) = (a.render_text(&e), b.render_text(&e));
        assert!(matches!(ta, Text::Static("v-${1}")));
        assert!(std::ptr::eq(ta.as_ptr(), tb.as_ptr()));
        let (ba, bb) = (a.constant_bytes().unwrap(), b.constant_bytes().unwrap());
        assert_eq!(&ba[..], b"v-${1}");
        assert_eq!(ba.as_ptr(), bb.as_ptr(), "static bytes, not copies");
        // Not interned unless asked, nor past the bound: shared and counted, rendered the same.
        let plain = Template::parse("v-$${1}").unwrap();
        assert!(matches!(plain.render_text(&e), Text::Shared(ref s) if **s == *"v-${1}"));
        let long = "x".repeat(INTERNED_LITERAL_MAX + 1);
        let t = Template::parse(&long).unwrap().intern_constant();
        assert!(matches!(t.render_text(&e), Text::Shared(ref s) if **s == *long));
        assert_eq!(&t.constant_bytes().unwrap()[..], long.as_bytes());
        assert_eq!(Template::parse("").unwrap().constant_bytes().unwrap(), "");
        assert!(
            Template::parse("a ${user}")
                .unwrap()
                .constant_bytes()
                .is_none()
        );
    }

    #[test]
    fn rejects_unclosed_and_empty_references() {
        assert!(Template::parse("a ${b").is_err());
        assert!(Template::parse("a ${ }").is_err());
    }
}
