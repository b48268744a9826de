//! YAML with positions: serde_yaml parses the values, and a second pass over yaml-rust2's
//! marked events records where every key and sequence item stands, so that any error found
//! later (by serde, by a filter's builder, by graph checks) can name its file, line and column.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_yaml::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::ConfigError;

/// Line and column (both 1-based) of every path in one document. Paths are written the way
/// errors print them: `policies[0].chain[1].access_token.store`.
#[derive(Default, Debug)]
pub struct Positions {
    map: HashMap<String, (usize, usize)>,
}

impl Positions {
    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn find(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(pos) = self.map.get(p) {
                return *pos;
            }
            match parent(p) {
                Some(up) => p = up,
                None => return self.map.get("").copied().unwrap_or((1, 1)),
            }
        }
    }
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Joins a key onto a path.
pub fn key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

enum Frame {
    Map {
        path: String,
        pending_key: Option<String>,
        expecting_key: bool,
        /// A mapping that is a sequence item: its event mark can stand past its first key,
        /// so its position is taken from that key instead.
        item: bool,
    },
    Seq {
        path: String,
        next: usize,
    },
}

struct Recorder {
    stack: Vec<Frame>,
    positions: Positions,
}

impl Recorder {
    /// The path of the node that starts now, recording its position; for a mapping key the
    /// scalar is the key itself and nothing is returned.
    fn begin_node(
        &mut self,
        mark: Marker,
        is_scalar: bool,
        scalar: Option<&str>,
    ) -> Option<String> {
        let pos = (mark.line(), mark.col() + 1);
        match self.stack.last_mut() {
            None => {
                self.positions.map.entry(String::new()).or_insert(pos);
                Some(String::new())
            }
            Some(Frame::Seq { path, next }) => {
                let p = index(path, *next);
                *next += 1;
                self.positions.map.insert(p.clone(), pos);
                Some(p)
            }
            Some(Frame::Map {
                path,
                pending_key,
                expecting_key,
                item,
            }) => {
                if *expecting_key {
                    *expecting_key = false;
                    if is_scalar {
                        let k = key(path, scalar.unwrap_or(""));
                        self.positions.map.insert(k.clone(), pos);
                        if std::mem::take(item) {
                            self.positions.map.insert(path.clone(), pos);
                        }
                        *pending_key = Some(k);
                    } else {
                        // A complex key: positions below it are not addressable by path.
                        *pending_key = Some(key(path, "?"));
                    }
                    None
                } else {
                    *expecting_key = true;
                    pending_key.take()
                }
            }
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(ref s, ..) => {
                self.begin_node(mark, true, Some(s));
            }
            Event::Alias(_) => {
                self.begin_node(mark, true, None);
            }
            Event::MappingStart(..) => {
                // A mapping used as a key gets a placeholder path; its content is skipped.
                let was_key = matches!(
                    self.stack.last(),
                    Some(Frame::Map {
                        expecting_key: true,
                        ..
                    })
                );
                let item = matches!(self.stack.last(), Some(Frame::Seq { .. }));
                let path = self.begin_node(mark, false, None).unwrap_or_default();
                let path = if was_key { "?".to_owned() } else { path };
                self.stack.push(Frame::Map {
                    path,
                    pending_key: None,
                    expecting_key: true,
                    item,
                });
            }
            Event::SequenceStart(..) => {
                let was_key = matches!(
                    self.stack.last(),
                    Some(Frame::Map {
                        expecting_key: true,
                        ..
                    })
                );
                let path = self.begin_node(mark, false, None).unwrap_or_default();
                let path = if was_key { "?".to_owned() } else { path };
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

/// One parsed YAML file.
#[derive(Debug)]
pub struct Document {
    pub file: PathBuf,
    pub value: Value,
    pub positions: Positions,
}

impl Document {
    pub fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.positions.find(path);
        ConfigError {
            file: self.file.clone(),
            line,
            column,
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

/// Parses `source` (the content of `file`). Syntax errors come back with serde_yaml's own
/// line and column.
pub fn parse(file: &Path, source: &str) -> Result<Document, ConfigError> {
    let value: Value = serde_yaml::from_str(source).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            path: String::new(),
            message: format!("invalid YAML: {}", strip_location(&e.to_string())),
        }
    })?;
    let mut recorder = Recorder {
        stack: Vec::new(),
        positions: Positions::default(),
    };
    // serde_yaml accepted the text, so the event parser will too; positions are best effort.
    let _ = Parser::new_from_str(source).load(&mut recorder, false);
    Ok(Document {
        file: file.to_owned(),
        value,
        positions: recorder.positions,
    })
}

/// A deserialisation error as the operator reads it: without serde_yaml's own location (we
/// print ours) and without the offending string value, which after `${ENV}` expansion may be a
/// secret (`invalid type: string "hunter2", expected u32` becomes `invalid type: a string,
/// expected u32`). Key names, variant names and numbers stay.
pub fn clean_message(message: &str) -> String {
    let message = strip_location(message);
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i]);
        out.push_str("a string");
        let quoted = &rest[i + "string \"".len()..];
        // Skip to the closing quote, honouring backslash escapes (Debug formatting).
        let mut escaped = false;
        let mut end = quoted.len();
        for (j, c) in quoted.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = j + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = &quoted[end..];
    }
    out.push_str(rest);
    out
}

/// serde_yaml appends " at line L column C" to its messages; we print the location ourselves.
pub fn strip_location(message: &str) -> &str {
    match message.find(" at line ") {
        Some(i) => &message[..i],
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_keys_and_items() {
        let src = "a: 1\nlist:\n  - name: x\n    deep:\n      k: v\n  - name: y\n";
        let doc = parse(Path::new("t.yaml"), src).unwrap();
        assert_eq!(doc.positions.find("a"), (1, 1));
        assert_eq!(doc.positions.find("list"), (2, 1));
        assert_eq!(doc.positions.find("list[0]"), (3, 5));
        assert_eq!(doc.positions.find("list[0].deep.k"), (5, 7));
        assert_eq!(doc.positions.find("list[1].name"), (6, 5));
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(doc.positions.find("list[1].name.zzz"), (6, 5));
        assert_eq!(doc.positions.find("list[7]"), (2, 1));
    }

    #[test]
    fn flow_style_positions() {
        let doc = parse(
            Path::new("t.yaml"),
            "r: { path: /x, methods: [GET, POST] }\n",
        )
        .unwrap();
        assert_eq!(doc.positions.find("r.methods"), (1, 16));
        assert_eq!(doc.positions.find("r.methods[1]"), (1, 31));
    }

    #[test]
    fn syntax_errors_carry_a_location() {
        let e = parse(Path::new("bad.yaml"), "a: 1\nb: [1, 2\n").unwrap_err();
        assert!(e.line >= 2, "{e}");
        assert!(e.message.starts_with("invalid YAML"), "{e}");
    }

    #[test]
    fn string_values_never_reach_error_messages() {
        let m = clean_message(
            r#"invalid type: string "p\"ass\\word", expected u32 at line 3 column 5"#,
        );
        assert_eq!(m, "invalid type: a string, expected u32");
        assert_eq!(
            clean_message("unknown variant `memry`, expected `memory` or `sql`"),
            "unknown variant `memry`, expected `memory` or `sql`"
        );
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let e = parse(Path::new("d.yaml"), "a: 1\na: 2\n").unwrap_err();
        assert!(e.message.contains("duplicate"), "{e}");
    }
}
