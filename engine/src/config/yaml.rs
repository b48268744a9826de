//! YAML with positions: serde_yaml parses the values, and a second pass over yaml-rust2's
//! marked events records where every key and sequence item stands, so that any error found
//! later (by serde, by a filter's builder, by graph checks) can name its file, line and column.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_yaml::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, ScanError};

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
        /// The scalar keys seen so far, to place a duplicate (only while locating an error).
        keys: Option<HashSet<String>>,
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

#[derive(Default)]
struct Recorder {
    stack: Vec<Frame>,
    positions: Positions,
    /// Set while locating a syntax error: mappings remember their keys.
    find_duplicates: bool,
    /// Every key given twice in one mapping: its name, its mapping's path, its own path and its
    /// second position.
    duplicates: Vec<Duplicate>,
    /// Where each document starts.
    documents: Vec<(usize, usize)>,
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
                keys,
                expecting_key,
                item,
            }) => {
                if *expecting_key {
                    *expecting_key = false;
                    if is_scalar {
                        let name = scalar.unwrap_or("");
                        let k = key(path, name);
                        if let Some(keys) = keys
                            && !keys.insert(name.to_owned())
                        {
                            self.duplicates.push(Duplicate {
                                name: name.to_owned(),
                                mapping: path.clone(),
                                path: k.clone(),
                                at: pos,
                            });
                        }
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
                let keys = self.find_duplicates.then(HashSet::new);
                self.stack.push(Frame::Map {
                    path,
                    pending_key: None,
                    keys,
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
            Event::DocumentStart => self.documents.push((mark.line(), mark.col() + 1)),
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

/// Parses `source` (the content of `file`). A syntax error comes back at the line and column
/// of the mistake ([`locate`]).
pub fn parse(file: &Path, source: &str) -> Result<Document, ConfigError> {
    let value: Value = serde_yaml::from_str(source).map_err(|e| locate(file, source, &e))?;
    let mut recorder = Recorder::default();
    // serde_yaml accepted the text, so the event parser will too; positions are best effort.
    let _ = replay(source, &mut recorder);
    Ok(Document {
        file: file.to_owned(),
        value,
        positions: recorder.positions,
    })
}

/// A syntax error that serde_yaml found, placed where the operator should look. serde_yaml
/// places most of them itself; for these it does not, and the event parser's pass is asked:
/// - a key given twice: serde_yaml points at the mapping, the pass at the second key;
/// - a control character: serde_yaml gives its byte offset in the message and a location of
///   1:1, the offset is turned into a line and column;
/// - more than one document, which serde_yaml reports with no location: a stray `---`, or a
///   line indented less than the first, which starts a second document where the event parser
///   refuses it. The error is placed at the second document's start or at the refusal.
fn locate(file: &Path, source: &str, e: &serde_yaml::Error) -> ConfigError {
    let full = e.to_string();
    let mut message = strip_location(&full).to_owned();
    let mut at = e.location().map(|l| (l.line(), l.column()));
    let mut path = String::new();
    if let Some((text, offset)) = split_position(&message) {
        at = Some(line_and_column(source, offset));
        message = text.to_owned();
    }
    let duplicate = message.contains("duplicate entry");
    let several = message.contains("more than one document");
    if duplicate || several || at.is_none() {
        let mut recorder = Recorder {
            find_duplicates: true,
            ..Recorder::default()
        };
        let parsed = replay(source, &mut recorder);
        // serde_yaml's message: `[MAPPING: ]duplicate entry with key K`, K as serde_yaml
        // renders it (`"a"`, `1`, `` `true` ``), or `with null key`, or `in YAML map`.
        let (mapping, rest) = match message.rsplit_once(": duplicate entry") {
            Some((mapping, rest)) => (mapping, rest),
            None => (
                "",
                message.split_once("duplicate entry").map_or("", |(_, r)| r),
            ),
        };
        let same_key = |d: &&Duplicate| match rest.strip_prefix(" with key ") {
            Some(key) => {
                let n = d.name.as_str();
                key == format!("{n:?}") || key == format!("`{n}`") || key == n
            }
            None => {
                rest == " with null key" && ["", "~", "null", "Null", "NULL"].contains(&&*d.name)
            }
        };
        // The event pass compares keys as text, where serde_yaml tells `1` from `"1"`: the
        // duplicate is the one serde_yaml names, in the mapping it names.
        let dups = &recorder.duplicates;
        let found = dups
            .iter()
            .find(|d| d.mapping == mapping && same_key(d))
            .or_else(|| dups.iter().find(same_key))
            .or_else(|| dups.iter().find(|d| d.mapping == mapping));
        if duplicate && let Some(d) = found {
            at = Some(d.at);
            path = d.path.clone();
            // The path now names the duplicate itself.
            message = format!("duplicate entry{rest}");
        } else if several && let Some(&second) = recorder.documents.get(1) {
            at = Some(second);
            message = "a second document starts here; a file holds one".to_owned();
        } else if let Err(refused) = parsed {
            let m = refused.marker();
            at = Some((m.line(), m.col() + 1));
            if several {
                let why = refused.to_string();
                let why = why.split(" at byte ").next().unwrap_or_default();
                message = format!(
                    "a line indented less than the file's first key, or a second document, \
                     starts here; a file holds one document ({why})"
                );
            }
        }
    }
    let (line, column) = at.unwrap_or((1, 1));
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        path,
        message: format!("invalid YAML: {message}"),
    }
}

/// A key given twice in one mapping, as the event pass saw it.
struct Duplicate {
    name: String,
    mapping: String,
    path: String,
    at: (usize, usize),
}

/// Nesting deeper than this is not recorded: serde_yaml refuses it (its limit is 128), and a
/// path per level would cost memory in the square of the depth.
const MAX_DEPTH: usize = 256;

/// Feeds `source`'s events to `recorder`, one at a time, up to [`MAX_DEPTH`] levels of nesting.
/// (`Parser::load` recurses once per level without a bound for block nesting: on a file that
/// serde_yaml refused, a hundred thousand `- ` could overflow the stack.)
fn replay(source: &str, recorder: &mut Recorder) -> Result<(), ScanError> {
    let mut parser = Parser::new_from_str(source);
    let mut depth = 0usize;
    loop {
        let (event, mark) = parser.next_token()?;
        match event {
            Event::StreamEnd => return Ok(()),
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Ok(());
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
        recorder.on_event(event, mark);
    }
}

/// libyaml's scanner errors end in " at position N", N a byte offset into the source.
fn split_position(message: &str) -> Option<(&str, usize)> {
    let (text, n) = message.rsplit_once(" at position ")?;
    Some((text, n.trim().parse().ok()?))
}

/// Line and column (1-based) of a byte offset; the column counts characters.
fn line_and_column(source: &str, offset: usize) -> (usize, usize) {
    let bytes = &source.as_bytes()[..offset.min(source.len())];
    let line = 1 + bytes.iter().filter(|&&b| b == b'\n').count();
    let start = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let column = 1 + String::from_utf8_lossy(&bytes[start..]).chars().count();
    (line, column)
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
    fn duplicate_keys_are_refused_at_the_second_copy() {
        let e = parse(Path::new("d.yaml"), "a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 1), "{e}");
        assert_eq!(e.path, "a", "{e}");
        assert!(e.message.contains("duplicate entry with key \"a\""), "{e}");
        let src = "list:\n  - name: x\n    body: one\n    k: v\n    body: two\n";
        let e = parse(Path::new("d.yaml"), src).unwrap_err();
        assert_eq!((e.line, e.column), (5, 5), "{e}");
        assert_eq!(e.path, "list[0].body", "{e}");
        assert_eq!(
            e.message, "invalid YAML: duplicate entry with key \"body\"",
            "{e}"
        );
        // The same key in two mappings is no duplicate; the one that is, is found.
        let src = "a: { k: 1 }\nb: { k: 2 }\nc: { k: 3, k: 4 }\n";
        let e = parse(Path::new("d.yaml"), src).unwrap_err();
        assert_eq!((e.line, e.path.as_str()), (3, "c.k"), "{e}");
        // `1` and `"1"` are two keys to serde_yaml: the duplicate is the one it names.
        let src = "a: { 1: x, \"1\": y }\nb: 1\nb: 2\n";
        let e = parse(Path::new("d.yaml"), src).unwrap_err();
        assert_eq!((e.line, e.path.as_str()), (3, "b"), "{e}");
    }

    #[test]
    fn the_duplicate_is_the_one_serde_yaml_names() {
        // `true` and `"true"` are two keys to serde_yaml, one text to the event pass.
        let src = "t: { true: 1, \"true\": 2 }\nu: { true: 1, true: 2 }\n";
        let e = parse(Path::new("d.yaml"), src).unwrap_err();
        assert_eq!((e.line, e.path.as_str()), (2, "u.true"), "{e}");
        // A key serde_yaml renders escaped.
        let src = "a: { 1: x, \"1\": y }\n'C:\\dir': 1\n'C:\\dir': 2\n";
        let e = parse(Path::new("d.yaml"), src).unwrap_err();
        assert_eq!((e.line, e.path.as_str()), (3, "C:\\dir"), "{e}");
    }

    #[test]
    fn deep_nesting_in_a_refused_file_is_no_crash() {
        // serde_yaml refuses both before its depth limit (a second document; a duplicate), so
        // the event pass sees the whole depth: it must not recurse per level, nor build a path
        // per level beyond a bound.
        let deep = "- ".repeat(100_000);
        let started = std::time::Instant::now();
        let e = parse(Path::new("n.yaml"), &format!("a: 1\n---\n{deep}x\n")).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = parse(Path::new("n.yaml"), &format!("a: 1\na: 2\nb:\n  {deep}x\n")).unwrap_err();
        assert_eq!((e.line, e.path.as_str()), (2, "a"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_second_document_is_placed_at_its_start_even_when_it_is_broken() {
        let e = parse(Path::new("m.yaml"), "a: 1\n---\nb: [1,\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn errors_serde_yaml_leaves_unplaced_are_placed() {
        // A control character: serde_yaml gives a byte offset in its message.
        let e = parse(Path::new("c.yaml"), "a: 1\nb: 2\nc: x\u{0}y\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 5), "{e}");
        assert_eq!(
            e.message, "invalid YAML: control characters are not allowed",
            "{e}"
        );
        // A line indented less than the first key's ends the document.
        let src = "# a comment\n   policies:\n  - name: p\n";
        let e = parse(Path::new("i.yaml"), src).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("second document"), "{e}");
        // A second document.
        let e = parse(Path::new("m.yaml"), "a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("second document"), "{e}");
    }

    #[test]
    fn offsets_become_lines_and_columns() {
        assert_eq!(line_and_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_and_column("ab\ncd", 2), (1, 3));
        assert_eq!(line_and_column("ab\ncd", 3), (2, 1));
        assert_eq!(line_and_column("é\nxé!", 6), (2, 3));
        assert_eq!(line_and_column("ab", 99), (1, 3));
        assert_eq!(split_position("bad at position 14"), Some(("bad", 14)));
        assert_eq!(split_position("bad at line 1"), None);
    }
}
