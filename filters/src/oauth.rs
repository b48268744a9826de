//! What the OAuth filters share: RFC 6749 §5.2 error responses, §5.1 token responses, token
//! generation, scopes, and the access-token settings of the product documents.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use rand::RngCore;
use serde::Deserialize;

use crate::registry::BuildError;
use crate::template::Template;
use crate::{Exchange, Failure, Response, no_store};

/// RFC 6749 §5.2 error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::UnauthorizedClient => "unauthorized_client",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::InvalidScope => "invalid_scope",
        }
    }
}

/// An OAuth error as the token endpoint answers it.
#[derive(Debug)]
pub struct OAuthError {
    pub code: ErrorCode,
    pub description: &'static str,
    /// The client authenticated (or was asked to) with HTTP Basic: `invalid_client` is a 401
    /// with `WWW-Authenticate: Basic` (RFC 6749 §5.2). Without it, `invalid_client` is a 400,
    /// RFC 6749 §5.2's default: a 401 must carry a challenge (RFC 7235 §3.1), and for
    /// credentials in the form body or the query there is no HTTP scheme to offer.
    pub basic_challenge: bool,
}

impl OAuthError {
    pub fn new(code: ErrorCode, description: &'static str) -> Self {
        OAuthError {
            code,
            description,
            basic_challenge: false,
        }
    }

    pub fn response(&self) -> Response {
        let challenge = self.code == ErrorCode::InvalidClient && self.basic_challenge;
        let status = if challenge {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        let body =
            serde_json::json!({"error": self.code.as_str(), "error_description": self.description});
        let mut r = crate::json_response(status, &body);
        no_store(r.headers_mut());
        if challenge {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"oauth\", charset=\"UTF-8\""),
            );
        }
        r
    }

    /// The failure a filter returns: the reason (the error code) goes to `failure.reason`.
    pub fn into_failure(self) -> Failure {
        let response = self.response();
        Failure::new(self.code.as_str(), response)
    }
}

/// A fresh token: `len` alphanumeric characters from the thread-local CSPRNG (ChaCha, seeded
/// from the operating system and reseeded periodically). With a `place` from the token's store
/// ([`store::Place`]), the token starts with it, when that leaves at least
/// [`MIN_TOKEN_LENGTH`] random characters (a place is not secret: what makes the token
/// unguessable is what follows it).
pub fn generate_token(len: usize, place: Option<store::Place>) -> String {
    const ALPHABET: &[u8; 62] = store::TOKEN_ALPHABET;
    // Bytes drawn in blocks (one RNG call per 64 bytes, not one per character); a byte below
    // 248 = 4 × 62 maps to a character without bias (`b >> 2`: each character from four byte
    // values), the rest are dropped.
    let mut rng = rand::rng();
    // Not `vec![0; len]`: that is a `calloc`, which glibc serves past its per-thread cache
    // (≈ 200 instructions against ≈ 30 for the `malloc` of `with_capacity`).
    let mut token = Vec::with_capacity(len);
    if let Some(place) = place.filter(|_| len >= MIN_TOKEN_LENGTH + store::Place::CHARS) {
        place.write(&mut token);
    }
    let mut block = [0u8; 64];
    while token.len() < len {
        rng.fill_bytes(&mut block);
        let missing = len - token.len();
        let mut chars = [0u8; 64];
        let mut n = 0;
        for &b in &block {
            if b < 248 {
                chars[n] = ALPHABET[usize::from(b >> 2)];
                n += 1;
                if n == missing {
                    break;
                }
            }
        }
        token.extend_from_slice(&chars[..n]);
    }
    String::from_utf8(token).expect("the alphabet is ASCII")
}

/// A scope's tokens (RFC 6749 §3.3: space-delimited, case-sensitive), without a set.
pub fn scope_tokens(s: &str) -> impl Iterator<Item = &str> {
    s.split(' ').filter(|t| !t.is_empty())
}

/// A scope as a set of scope tokens.
pub fn parse_scope(s: &str) -> BTreeSet<&str> {
    scope_tokens(s).collect()
}

/// `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
pub fn valid_scope(s: &str) -> bool {
    scope_tokens(s).all(|t| {
        t.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
    })
}

pub fn join_scope<'a>(set: impl IntoIterator<Item = &'a str>) -> String {
    set.into_iter().collect::<Vec<_>>().join(" ")
}

/// The RFC 6749 §5.1 success response. Written directly rather than through a JSON value
/// tree: this is the token endpoint's hot path.
pub fn token_response(
    access_token: &str,
    token_type: &str,
    expires_in: u64,
    refresh_token: Option<&str>,
    scope: &str,
) -> Response {
    let body = token_json(access_token, token_type, expires_in, refresh_token, scope);
    token_response_from_body(Bytes::from(body))
}

/// A string without a quote, a backslash or a control character is its own JSON (what
/// serde_json would write too): the gateway's tokens always are, and go in as they are;
/// anything else (a scope or token type from requests and configuration) is escaped. The test
/// is a fold without an early exit, which the compiler turns into vector compares: the
/// byte-at-a-time check it replaces was 2% of the refresh grant's CPU.
fn plain_json(s: &str) -> bool {
    s.bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'))
}

/// The body of [`token_response`]. When no string needs escaping (the usual answer), it is
/// allocated at its exact length: `Bytes` takes a `Vec` whose length is its capacity as it
/// is, and any other `Vec` with a second allocation for its reference count.
fn token_json(
    access_token: &str,
    token_type: &str,
    expires_in: u64,
    refresh_token: Option<&str>,
    scope: &str,
) -> Vec<u8> {
    const ACCESS: &[u8] = b"{\"access_token\":";
    const TYPE: &[u8] = b",\"token_type\":";
    const EXPIRES: &[u8] = b",\"expires_in\":";
    const REFRESH: &[u8] = b",\"refresh_token\":";
    const SCOPE: &[u8] = b",\"scope\":";
    let mut expires = itoa::Buffer::new();
    let expires = expires.format(expires_in).as_bytes();
    // A plain string's JSON is the string in quotes.
    let quoted = |s: &str| s.len() + 2;
    let all_plain = plain_json(access_token)
        & plain_json(token_type)
        & refresh_token.is_none_or(plain_json)
        & plain_json(scope);
    let len = ACCESS.len()
        + quoted(access_token)
        + TYPE.len()
        + quoted(token_type)
        + EXPIRES.len()
        + expires.len()
        + refresh_token.map_or(0, |rt| REFRESH.len() + quoted(rt))
        + if scope.is_empty() {
            0
        } else {
            SCOPE.len() + quoted(scope)
        }
        + 1;
    // Escapes make the body longer than `len`; the `Vec` then grows as it needs.
    let mut body = Vec::with_capacity(len);
    let string = |body: &mut Vec<u8>, s: &str| {
        if all_plain || plain_json(s) {
            body.push(b'"');
            body.extend_from_slice(s.as_bytes());
            body.push(b'"');
        } else {
            // Writing a &str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *body, s);
        }
    };
    body.extend_from_slice(ACCESS);
    string(&mut body, access_token);
    body.extend_from_slice(TYPE);
    string(&mut body, token_type);
    body.extend_from_slice(EXPIRES);
    body.extend_from_slice(expires);
    if let Some(rt) = refresh_token {
        body.extend_from_slice(REFRESH);
        string(&mut body, rt);
    }
    if !scope.is_empty() {
        body.extend_from_slice(SCOPE);
        string(&mut body, scope);
    }
    body.push(b'}');
    body
}

pub fn token_response_from_body(body: Bytes) -> Response {
    // The same three headers on every token answer: built once, then copied (a copy of the
    // map is two allocations and a `memcpy`, where three inserts hash and place each name).
    static HEADERS: LazyLock<HeaderMap> = LazyLock::new(|| {
        let mut h = HeaderMap::with_capacity(3);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        no_store(&mut h);
        h
    });
    let mut r = http::Response::new(body);
    *r.headers_mut() = HEADERS.clone();
    r
}

/// "Access token settings" of the product documents.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessTokenConfig {
    /// The named token store ("Access Token will be stored here").
    pub store: String,
    pub expiry_secs: u64,
    pub length: usize,
    #[serde(rename = "type")]
    pub token_type: String,
    /// Name/value pairs stored with the token; values may be `${attribute}` templates.
    pub metadata: BTreeMap<String, String>,
}

impl Default for AccessTokenConfig {
    fn default() -> Self {
        AccessTokenConfig {
            store: "tokens".into(),
            expiry_secs: 3600,
            length: 54,
            token_type: "Bearer".into(),
            metadata: BTreeMap::new(),
        }
    }
}

/// Token lengths below this are refused: 22 alphanumeric characters carry about 131 bits.
pub const MIN_TOKEN_LENGTH: usize = 22;
pub const MAX_TOKEN_LENGTH: usize = 512;

pub fn check_length(path: &str, len: usize) -> Result<(), BuildError> {
    if (MIN_TOKEN_LENGTH..=MAX_TOKEN_LENGTH).contains(&len) {
        Ok(())
    } else {
        Err(BuildError::at(
            path,
            format!("{len} is outside {MIN_TOKEN_LENGTH}..={MAX_TOKEN_LENGTH} characters"),
        ))
    }
}

pub fn check_expiry(path: &str, secs: u64) -> Result<(), BuildError> {
    // Ten years: beyond that an expiry is a typo (and overflows nothing we rely on).
    if secs == 0 || secs > 10 * 365 * 86_400 {
        Err(BuildError::at(
            path,
            format!("{secs} s is not a usable lifetime (1 s to 10 years)"),
        ))
    } else {
        Ok(())
    }
}

/// The lifetime and length checks both grant filters make at build time; `refresh` is the
/// refresh token's `(expiry_secs, length)` when one is issued.
pub fn check_token_settings(
    access: &AccessTokenConfig,
    refresh: Option<(u64, usize)>,
) -> Result<(), BuildError> {
    check_length("access_token.length", access.length)?;
    check_expiry("access_token.expiry_secs", access.expiry_secs)?;
    if let Some((expiry, length)) = refresh {
        check_length("refresh_token.length", length)?;
        check_expiry("refresh_token.expiry_secs", expiry)?;
    }
    if access.token_type.trim().is_empty() {
        return Err(BuildError::at("access_token.type", "must not be empty"));
    }
    Ok(())
}

/// What both grant filters are built from: application validation, the token store, the
/// access-token settings, the metadata templates and the monitoring settings.
pub struct GrantBase {
    pub validation: crate::client_auth::ApplicationValidation,
    pub store: store::SharedStore,
    pub access: AccessTokenConfig,
    pub metadata: Metadata,
    pub monitor: crate::monitor::FilterMonitor,
    /// The monitoring settings' attribute that identifies the client, interned: every request
    /// that sets it carries the same text.
    pub client_attribute: &'static str,
}

impl GrantBase {
    /// The registry and the store through their futures.
    pub fn waiting(&self) -> crate::backend::Waiting<'_> {
        crate::backend::Waiting {
            registry: Some(self.validation.registry()),
            store: &*self.store,
        }
    }

    /// The registry and the store called on the spot, when neither ever waits.
    pub fn immediate(&self) -> Option<crate::backend::Immediate<'_>> {
        crate::backend::Immediate::of(Some(self.validation.registry()), &*self.store)
    }

    /// `refresh` is the refresh token's `(expiry_secs, length)` when the filter issues one.
    pub fn build(
        validation: crate::client_auth::ApplicationValidationConfig,
        access: AccessTokenConfig,
        monitoring: crate::monitor::MonitoringConfig,
        refresh: Option<(u64, usize)>,
        cx: &crate::registry::BuildContext,
    ) -> Result<Self, BuildError> {
        check_token_settings(&access, refresh)?;
        let store = cx.store("access_token.store", &access.store)?;
        let metadata = Metadata::build("access_token.metadata", &access.metadata)?;
        let validation = crate::client_auth::ApplicationValidation::build(validation, cx)?;
        let monitor = crate::monitor::FilterMonitor::new(monitoring, &access.store, cx);
        Ok(GrantBase {
            client_attribute: crate::attributes::intern(&monitor.config.client_attribute),
            validation,
            store,
            access,
            metadata,
            monitor,
        })
    }
}

/// Metadata templates, parsed once.
pub struct Metadata(Vec<(String, Template)>);

impl Metadata {
    pub fn build(path: &str, config: &BTreeMap<String, String>) -> Result<Self, BuildError> {
        let mut v = Vec::new();
        for (k, t) in config {
            let t = Template::parse(t).map_err(|m| BuildError::at(&format!("{path}.{k}"), m))?;
            v.push((k.clone(), t));
        }
        Ok(Metadata(v))
    }

    /// Renders into `into`, overriding names already there (token values win).
    pub fn render_into(&self, ex: &Exchange, into: &mut BTreeMap<String, String>) {
        for (k, t) in &self.0 {
            into.insert(k.clone(), t.render(ex));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_have_the_length_and_the_whole_alphabet() {
        for len in [0, 1, 46, 54, 200] {
            let t = generate_token(len, None);
            assert_eq!(t.len(), len);
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric()), "{t}");
        }
        // Every one of the 62 characters turns up in 20,000 draws (a missing one would mean a
        // broken mapping; the chance of a miss by luck is about 62 × e^-325).
        let many: String = (0..400).map(|_| generate_token(50, None)).collect();
        let seen: std::collections::BTreeSet<u8> = many.bytes().collect();
        assert_eq!(seen.len(), 62);
        assert_ne!(generate_token(54, None), generate_token(54, None));
    }

    /// A token minted with a place starts with it when at least [`MIN_TOKEN_LENGTH`] random
    /// characters follow, and is then the same length; shorter, it is random throughout.
    #[test]
    fn a_token_starts_with_its_place_when_that_leaves_enough_random() {
        let place = store::Place::new(4321, 98_765);
        let enough = MIN_TOKEN_LENGTH + store::Place::CHARS;
        for len in [enough, 46, 54, 200] {
            let t = generate_token(len, Some(place));
            assert_eq!(t.len(), len);
            assert_eq!(store::Place::parse(&t), Some(place), "{t}");
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric()), "{t}");
        }
        // One short of it: 400 tokens that would all start with the place's characters if it
        // were written; random ones share those 7 characters with odds of 62^-7 each.
        let mut prefix = Vec::new();
        place.write(&mut prefix);
        for _ in 0..400 {
            let t = generate_token(enough - 1, Some(place));
            assert_eq!(t.len(), enough - 1);
            assert_ne!(t.as_bytes()[..store::Place::CHARS], prefix[..], "{t}");
        }
    }

    #[test]
    fn generated_characters_are_uniform() {
        // 620,000 characters: 10,000 expected of each, a standard deviation of about 100; a
        // biased mapping (a modulo that favours some characters by a quarter or more) lands
        // far outside ±5%.
        let mut counts = std::collections::HashMap::<u8, u32>::new();
        for _ in 0..10_000 {
            for b in generate_token(62, None).bytes() {
                *counts.entry(b).or_default() += 1;
            }
        }
        assert_eq!(counts.len(), 62);
        for (c, n) in counts {
            assert!(
                (9_500..=10_500).contains(&n),
                "{} drawn {n} times",
                c as char
            );
        }
    }

    #[test]
    fn scope_syntax() {
        assert!(valid_scope("read write:all"));
        assert!(!valid_scope("read \"quoted\""));
        assert!(!valid_scope("caf\u{e9}"));
        assert_eq!(join_scope(parse_scope("b  a b")), "a b");
    }

    #[test]
    fn token_responses_are_valid_json_with_escaping() {
        let r = token_response("abc", "Bearer", 3600, Some("d\"e\\f"), "read \"x\"");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["access_token"], "abc");
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 3600);
        assert_eq!(v["refresh_token"], "d\"e\\f");
        assert_eq!(v["scope"], "read \"x\"");
        let r = token_response("abc", "Bearer", 1, None, "");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert!(v.get("refresh_token").is_none() && v.get("scope").is_none());
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(r.headers()[header::PRAGMA], "no-cache");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(r.headers().len(), 3);
    }

    #[test]
    fn a_body_without_escapes_is_allocated_at_its_exact_length() {
        for (refresh, scope) in [(Some("r".repeat(46)), "read write"), (None, "")] {
            let body = token_json(&"a".repeat(54), "Bearer", 3600, refresh.as_deref(), scope);
            assert_eq!(
                body.len(),
                body.capacity(),
                "{}",
                String::from_utf8_lossy(&body)
            );
            serde_json::from_slice::<serde_json::Value>(&body).unwrap();
        }
        // With an escape the body is still whole, only longer than first reserved.
        let body = token_json("a", "Bearer", 1, Some("q\"uote"), "x");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["refresh_token"], "q\"uote");
        assert_eq!(v["scope"], "x");
    }

    #[test]
    fn token_response_strings_are_written_as_serde_json_writes_them() {
        let long = "aZ09".repeat(40);
        for s in [
            "plainToken123",
            long.as_str(),
            "new\nline",
            "tab\tand\u{1}control",
            "quote\"inside",
            "back\\slash",
            "caf\u{e9} \u{7f} a/b",
            "",
        ] {
            let r = token_response("abc", "Bearer", 1, Some(s), "");
            let body = std::str::from_utf8(r.body()).unwrap();
            let want = format!(",\"refresh_token\":{}}}", serde_json::to_string(s).unwrap());
            assert!(body.ends_with(&want), "{s:?}: {body}");
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["refresh_token"], s);
        }
    }

    #[test]
    fn invalid_client_with_basic_carries_the_challenge() {
        let mut e = OAuthError::new(ErrorCode::InvalidClient, "x");
        e.basic_challenge = true;
        let r = e.response();
        assert_eq!(r.status(), 401);
        assert!(
            r.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Basic")
        );
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(r.headers()[header::PRAGMA], "no-cache");
        for code in [ErrorCode::InvalidGrant, ErrorCode::InvalidClient] {
            let r = OAuthError::new(code, "x").response();
            assert_eq!(r.status(), 400, "{code:?} without a Basic challenge");
            assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
        }
    }
}
