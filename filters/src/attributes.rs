//! The per-request exchange and its named attributes.
//!
//! Attributes are what YAML refers to: `http.method`, `http.path`, `http.host`,
//! `http.header.NAME`, `http.query.NAME`, `http.form.NAME`, `authentication.subject.id`,
//! `oauth.client_id`, `failure.reason`, ... The `http.*` family is read from the request on
//! demand (the query string and the form body are parsed at most once, on first use); the rest
//! are set by filters.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use bytestring::ByteString;
use http::{HeaderMap, HeaderValue, Method, StatusCode, request::Parts};
use smallvec::SmallVec;

/// A parsed `application/x-www-form-urlencoded` or query string, keeping every occurrence:
/// RFC 6749 §3.2 forbids repeated parameters, so filters need to see repeats to refuse them.
///
/// Decoded as `form_urlencoded::parse` decodes (`+` is a space, `%XX` escapes, invalid UTF-8
/// replaced), but without a `String` per name and value: a field that needs no decoding (nearly
/// all of them: tokens, grant types, client ids) is a range of the input. A form body is kept
/// as the request's own `Bytes` (a reference, not a copy); a query string is copied once. This
/// is the token endpoint's hot path.
#[derive(Default)]
pub struct Params {
    text: ByteString,
    fields: Vec<(Field, Field)>,
}

/// A name or a value: a range of [`Params::text`] or, when it had escapes, its decoded text.
enum Field {
    At(u32, u32),
    Decoded(Box<str>),
}

/// No parameters: a query string or a form that is not there.
static NO_PARAMS: Params = Params {
    text: ByteString::new(),
    fields: Vec::new(),
};

impl Params {
    /// Parses a copy of `input`.
    pub fn parse(input: &[u8]) -> Self {
        match std::str::from_utf8(input) {
            Ok(text) => Self::parse_text(ByteString::from(text)),
            Err(_) => Self::parse_lossy(input),
        }
    }

    /// Parses `input` where it is, keeping a reference to it (a `Bytes` clone, no copy).
    pub fn parse_bytes(input: &Bytes) -> Self {
        match ByteString::try_from(input.clone()) {
            Ok(text) => Self::parse_text(text),
            Err(_) => Self::parse_lossy(input),
        }
    }

    fn parse_text(text: ByteString) -> Self {
        // Offsets are u32: far above any body or query the limits let through.
        if u32::try_from(text.len()).is_err() {
            return Self::parse_lossy(text.as_bytes());
        }
        // Sized for the usual handful of fields; a body of bare `&`s must not reserve room
        // for each of them (empty pairs are skipped).
        let pairs = memchr::memchr_iter(b'&', text.as_bytes()).take(15).count() + 1;
        let mut fields = Vec::with_capacity(pairs);
        // Byte searches: both separators are ASCII, so every offset is a char boundary (a
        // `char` pattern costs several times more on fields this short).
        // One search of the whole text for escapes: without any (the usual body), no field
        // is searched on its own (a search per field costs more than the field).
        let escaped = memchr::memchr2(b'+', b'%', text.as_bytes()).is_some();
        let mut start = 0;
        for pair in text.as_bytes().split(|&b| b == b'&') {
            let at = start;
            start += pair.len() + 1;
            if pair.is_empty() {
                continue;
            }
            let (name, value) = match memchr::memchr(b'=', pair) {
                Some(eq) => ((at, at + eq), (at + eq + 1, at + pair.len())),
                None => ((at, at + pair.len()), (at + pair.len(), at + pair.len())),
            };
            fields.push(if escaped {
                (Self::field(&text, name), Self::field(&text, value))
            } else {
                (Self::at(name), Self::at(value))
            });
        }
        Params { text, fields }
    }

    fn field(text: &str, (from, to): (usize, usize)) -> Field {
        match unescape_form(&text[from..to]) {
            Some(bytes) => Field::Decoded(String::from_utf8_lossy(&bytes).into()),
            None => Self::at((from, to)),
        }
    }

    /// A field that needs no decoding: its range in the text.
    fn at((from, to): (usize, usize)) -> Field {
        // Both fit: the whole text's length was checked.
        Field::At(from as u32, to as u32)
    }

    /// Input that is not UTF-8 as a whole: each field decoded on its own, as the URL standard
    /// does (an escape may complete a multi-byte character begun by a raw byte).
    fn parse_lossy(input: &[u8]) -> Self {
        Params {
            text: ByteString::new(),
            fields: form_urlencoded::parse(input)
                .map(|(k, v)| (Field::Decoded(k.into()), Field::Decoded(v.into())))
                .collect(),
        }
    }

    fn text<'a>(&'a self, f: &'a Field) -> &'a str {
        match f {
            Field::At(from, to) => &self.text[*from as usize..*to as usize],
            Field::Decoded(s) => s,
        }
    }

    /// Every value of `name`, in order.
    pub(crate) fn values<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.fields
            .iter()
            .filter(move |(k, _)| self.text(k) == name)
            .map(|(_, v)| self.text(v))
    }

    /// The value of `name` when it occurs exactly once.
    pub fn single(&self, name: &str) -> Param<'_> {
        let mut found = self.values(name);
        match (found.next(), found.next()) {
            (None, _) => Param::Missing,
            (Some(v), None) => Param::Value(v),
            (Some(_), Some(_)) => Param::Repeated,
        }
    }

    /// The value of `name` when it occurs exactly once, empty or not; `None` when it is missing
    /// or repeated. What the `http.query.NAME` and `http.form.NAME` attributes read: a policy
    /// that checked the first of two values would let through a request whose backend reads
    /// the last (parameter pollution), and RFC 6749 §3.2 forbids repeats at the token
    /// endpoint, whose dispatch reads `http.form.grant_type`.
    pub fn once(&self, name: &str) -> Option<&str> {
        match self.single(name) {
            Param::Value(v) => Some(v),
            Param::Missing | Param::Repeated => None,
        }
    }
}

/// The bytes an `application/x-www-form-urlencoded` name or value stands for (`+` is a space,
/// then `%XX` escapes), or `None` when it has neither and stands for itself. The caller decides
/// what invalid UTF-8 means: replaced in a form field, refused in Basic credentials.
pub(crate) fn unescape_form(raw: &str) -> Option<Vec<u8>> {
    memchr::memchr2(b'+', b'%', raw.as_bytes())?;
    let spaced = raw.replace('+', " ");
    Some(percent_encoding::percent_decode_str(&spaced).collect())
}

/// One parameter looked up with [`Params::single`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param<'a> {
    Missing,
    Repeated,
    Value(&'a str),
}

impl<'a> Param<'a> {
    /// An empty value counts as missing (RFC 6749 §3.1: "parameters sent without a value
    /// MUST be treated as if they were omitted").
    pub fn value(self) -> Option<&'a str> {
        match self {
            Param::Value(v) if !v.is_empty() => Some(v),
            _ => None,
        }
    }
}

/// The response being built by the chain (headers set by `set_header`, status by
/// `set_response`). Sent as is when the chain ends on a pass without any node responding.
pub struct PendingResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Default for PendingResponse {
    fn default() -> Self {
        PendingResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }
}

/// Attribute names from the configuration, which requests carry as [`Text::Static`]. Each
/// distinct name is allocated once for the life of the process and never freed, so a request
/// copies a pointer instead of writing an `Arc`'s reference count (two locked instructions per
/// attribute set and dropped, on a cache line every worker writes). Names are few and stable:
/// a reload with the same names adds nothing. Values are never interned: they may be secrets
/// (a key set from `${ENV}`) that must not outlive the policy set that holds them, and they
/// change with reloads. Cold path: called when policies are built, never per request.
pub fn intern(s: &str) -> &'static str {
    static TABLE: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&known) = table.get(s) {
        return known;
    }
    let new: &'static str = Box::leak(Box::from(s));
    table.insert(new);
    new
}

/// An attribute's name or value: a constant of the code, a configured name or short constant
/// ([`intern`]), a longer constant shared with the node that set it, or text made for this
/// request. Only the last costs an allocation per request, and only the last two a reference
/// count or a free.
#[derive(Clone)]
pub enum Text {
    Static(&'static str),
    Shared(Arc<str>),
    Owned(String),
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Text::Static(s) => s,
            Text::Shared(s) => s,
            Text::Owned(s) => s,
        }
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text::Static(s)
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text::Owned(s)
    }
}

impl From<Arc<str>> for Text {
    fn from(s: Arc<str>) -> Self {
        Text::Shared(s)
    }
}

impl From<Text> for String {
    fn from(t: Text) -> Self {
        match t {
            Text::Owned(s) => s,
            other => other.to_string(),
        }
    }
}

/// One request on its way through a policy.
pub struct Exchange {
    pub request: Parts,
    pub body: Bytes,
    pub response: PendingResponse,
    /// Attributes set by filters, as (name, value); names are the YAML names. A request
    /// carries a handful, so a scan beats hashing every name, and the first four are kept
    /// inline: no allocation per request for the usual chain (the token endpoint sets three).
    attributes: SmallVec<[(Text, Text); 4]>,
    query: OnceLock<Params>,
    /// `None` when the body is not declared a form.
    form: OnceLock<Option<Params>>,
}

impl Exchange {
    pub fn new(request: Parts, body: Bytes) -> Self {
        Exchange {
            request,
            body,
            response: PendingResponse::default(),
            attributes: SmallVec::new(),
            query: OnceLock::new(),
            form: OnceLock::new(),
        }
    }

    pub fn method(&self) -> &Method {
        &self.request.method
    }

    pub fn path(&self) -> &str {
        self.request.uri.path()
    }

    pub fn headers(&self) -> &HeaderMap<HeaderValue> {
        &self.request.headers
    }

    /// The query string, parsed on first use. Without one, nothing is parsed or kept (the
    /// token filters look for credentials there on every grant).
    pub fn query(&self) -> &Params {
        match self.request.uri.query() {
            None | Some("") => &NO_PARAMS,
            Some(q) => self.query.get_or_init(|| Params::parse(q.as_bytes())),
        }
    }

    /// The body as a form, parsed on first use; empty unless the request says
    /// `Content-Type: application/x-www-form-urlencoded`.
    pub fn form(&self) -> &Params {
        self.declared_form().unwrap_or(&NO_PARAMS)
    }

    /// Whether the request says `Content-Type: application/x-www-form-urlencoded`.
    pub fn is_form(&self) -> bool {
        self.declared_form().is_some()
    }

    fn declared_form(&self) -> Option<&Params> {
        self.form
            .get_or_init(|| {
                let declared = self
                    .request
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| {
                        // The media type, before any parameter (`; charset=...`).
                        let v = v.as_bytes();
                        let end = v.iter().position(|&b| b == b';').unwrap_or(v.len());
                        v[..end]
                            .trim_ascii()
                            .eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
                    });
                declared.then(|| Params::parse_bytes(&self.body))
            })
            .as_ref()
    }

    pub fn set(&mut self, name: impl Into<Text>, value: impl Into<Text>) {
        let name = name.into();
        match self.attributes.iter_mut().find(|(n, _)| **n == *name) {
            Some((_, v)) => *v = value.into(),
            None => self.attributes.push((name, value.into())),
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Text> {
        let i = self.attributes.iter().position(|(n, _)| **n == *name)?;
        Some(self.attributes.swap_remove(i).1)
    }

    /// The value of a named attribute: one set by a filter, or one read from the request.
    pub fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        if let Some((_, v)) = self.attributes.iter().find(|(n, _)| **n == *name) {
            return Some(Cow::Borrowed(v));
        }
        let rest = name.strip_prefix("http.")?;
        match rest {
            "method" => Some(Cow::Borrowed(self.request.method.as_str())),
            "path" => Some(Cow::Borrowed(self.request.uri.path())),
            "query" => self.request.uri.query().map(Cow::Borrowed),
            "host" => self.host().map(Cow::Borrowed),
            _ => {
                if let Some(h) = rest.strip_prefix("header.") {
                    self.request
                        .headers
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .map(Cow::Borrowed)
                } else if let Some(q) = rest.strip_prefix("query.") {
                    self.query().once(q).map(Cow::Borrowed)
                } else if let Some(f) = rest.strip_prefix("form.") {
                    self.form().once(f).map(Cow::Borrowed)
                } else {
                    None
                }
            }
        }
    }

    /// The request's host without a port, from the URI or the `Host` header.
    pub fn host(&self) -> Option<&str> {
        let raw = match self.request.uri.host() {
            Some(h) => h,
            None => self
                .request
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())?,
        };
        Some(strip_port(raw))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split_once(']')
            .map(|(h, _)| &host[..h.len() + 1])
            .unwrap_or(host);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host)
}

impl fmt::Debug for Exchange {
    // Attribute values may be secrets (`http.form.client_secret`, a refresh token) or carry
    // them: Debug prints the names only, and the request line without its query string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.attributes.iter().map(|(n, _)| &**n).collect();
        names.sort_unstable();
        f.debug_struct("Exchange")
            .field("method", &self.request.method)
            .field("path", &self.request.uri.path())
            .field("body_len", &self.body.len())
            .field("attributes", &names)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(uri: &str, headers: &[(&str, &str)], body: &str) -> Exchange {
        let mut b = http::Request::builder().method("POST").uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        Exchange::new(parts, Bytes::from(body.to_owned()))
    }

    #[test]
    fn http_attributes_come_from_the_request() {
        let ex = exchange(
            "/a/b?x=1&y=2",
            &[
                ("host", "api.example.com:8443"),
                (
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
                ("x-team", "core"),
            ],
            "grant_type=refresh_token&scope=a+b",
        );
        assert_eq!(ex.get("http.method").as_deref(), Some("POST"));
        assert_eq!(ex.get("http.path").as_deref(), Some("/a/b"));
        assert_eq!(ex.get("http.host").as_deref(), Some("api.example.com"));
        assert_eq!(ex.get("http.header.x-team").as_deref(), Some("core"));
        assert_eq!(ex.get("http.query.y").as_deref(), Some("2"));
        assert_eq!(ex.get("http.form.scope").as_deref(), Some("a b"));
        assert_eq!(ex.get("http.form.missing"), None);
        assert_eq!(ex.get("nothing"), None);
    }

    #[test]
    fn a_repeated_parameter_has_no_attribute_value() {
        let ex = exchange(
            "/p?t=a&t=b&u=1&e=",
            &[("content-type", "application/x-www-form-urlencoded")],
            "grant_type=password&grant_type=refresh_token&scope=x&empty=",
        );
        assert_eq!(ex.get("http.query.t"), None);
        assert_eq!(ex.get("http.query.u").as_deref(), Some("1"));
        assert_eq!(ex.get("http.query.e").as_deref(), Some(""));
        assert_eq!(ex.get("http.form.grant_type"), None);
        assert_eq!(ex.get("http.form.scope").as_deref(), Some("x"));
        assert_eq!(ex.get("http.form.empty").as_deref(), Some(""));
    }

    #[test]
    fn form_is_empty_without_the_form_content_type() {
        let ex = exchange("/", &[("content-type", "application/json")], "a=1");
        assert_eq!(ex.get("http.form.a"), None);
    }

    #[test]
    fn repeated_and_empty_parameters_are_told_apart() {
        let p = Params::parse(b"a=1&a=2&b=&c=3");
        assert_eq!(p.single("a"), Param::Repeated);
        assert_eq!(p.single("b").value(), None);
        assert_eq!(p.single("c").value(), Some("3"));
        assert_eq!(p.single("d"), Param::Missing);
    }

    /// Every (name, value) in order, as decoded.
    fn pairs(p: &Params) -> Vec<(String, String)> {
        p.fields
            .iter()
            .map(|(k, v)| (p.text(k).to_owned(), p.text(v).to_owned()))
            .collect()
    }

    #[test]
    fn params_decode_exactly_as_form_urlencoded_does() {
        let inputs: &[&[u8]] = &[
            b"",
            b"&&",
            b"grant_type=refresh_token&refresh_token=abcDEF123",
            b"scope=a+b&x=%41%42&y=%zz&z=%&w=100%25",
            b"a=1=2&b&=c&&d=&",
            b"k%2Bey=v%2bal+ue&k+ey=1",
            "na\u{ef}ve=caf\u{e9}&\u{1F600}=%F0%9F%98%80".as_bytes(),
            b"bad=\xff\xfe&ok=1",
            b"bad=\xc3%A9&raw=\xc3",
            b"t=%C3%28&u=%E2%82",
        ];
        for input in inputs {
            let reference: Vec<(String, String)> = form_urlencoded::parse(input)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let copied = pairs(&Params::parse(input));
            let in_place = pairs(&Params::parse_bytes(&Bytes::copy_from_slice(input)));
            for ours in [copied, in_place] {
                assert_eq!(
                    ours,
                    reference,
                    "input {:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
        // Fields without escapes are ranges of the one copy, not strings of their own.
        let p = Params::parse(b"grant_type=refresh_token&scope=a+b");
        assert!(matches!(p.fields[0], (Field::At(0, 10), Field::At(11, 24))));
        assert!(matches!(&p.fields[1].1, Field::Decoded(s) if &**s == "a b"));
        // A body is parsed where it is: its fields are ranges of the request's own bytes.
        let body = Bytes::from_static(b"grant_type=refresh_token&refresh_token=abc");
        let p = Params::parse_bytes(&body);
        assert_eq!(p.text.as_ptr(), body.as_ptr());
        assert_eq!(p.single("refresh_token").value(), Some("abc"));
    }

    #[test]
    fn a_form_is_parsed_once_and_only_when_declared() {
        let ex = exchange(
            "/",
            &[(
                "content-type",
                "Application/X-WWW-Form-Urlencoded ; charset=utf-8",
            )],
            "a=1",
        );
        assert!(ex.is_form());
        assert_eq!(ex.form().single("a"), Param::Value("1"));
        assert!(std::ptr::eq(ex.form(), ex.form()));
        let ex = exchange("/", &[], "a=1");
        assert!(!ex.is_form());
        assert_eq!(ex.form().single("a"), Param::Missing);
    }

    #[test]
    fn interned_text_is_allocated_once_per_distinct_string() {
        let owned = String::from("bench.interned");
        let a = intern(&owned);
        let b = intern("bench.interned");
        assert_eq!(a, "bench.interned");
        assert!(
            std::ptr::eq(a, b),
            "the same string gives the same allocation"
        );
        assert!(
            !std::ptr::eq(a.as_ptr(), owned.as_ptr()),
            "a copy, not the caller's"
        );
        let c = intern("bench.interned2");
        assert_eq!(c, "bench.interned2");
        assert!(!std::ptr::eq(a, c));
        let mut ex = exchange("/", &[], "");
        ex.set(a, c);
        assert_eq!(ex.get("bench.interned").as_deref(), Some("bench.interned2"));
    }

    #[test]
    fn debug_never_prints_attribute_values() {
        let mut ex = exchange("/t?client_secret=s3cr3t", &[], "refresh_token=r3fr3sh");
        ex.set("oauth.refresh_token", "r3fr3sh");
        let printed = format!("{ex:?}");
        assert!(printed.contains("oauth.refresh_token"));
        assert!(!printed.contains("r3fr3sh"));
        assert!(!printed.contains("s3cr3t"));
    }

    #[test]
    fn host_ports_are_stripped() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
