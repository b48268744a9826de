//! "Application validation": find the client's credentials in the message, check them against
//! the client application registry, and (for the grant filters) the requested scope.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;
use smallvec::SmallVec;
use store::clients::{ClientApplication, SharedRegistry};

use crate::attributes::Param;
use crate::backend::Backend;
use crate::oauth::{ErrorCode, OAuthError};
use crate::registry::{BuildContext, BuildError};
use crate::{Exchange, FilterError};

/// "Find client application information from message".
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CredentialsIn {
    /// HTTP Basic (`client_secret_basic`); the default.
    #[default]
    AuthorizationHeader,
    /// Form fields (`client_secret_post`).
    FormBody,
    /// Query parameters: RFC 6749 §2.3.1 forbids it; accepted only when configured.
    QueryString,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApplicationValidationConfig {
    pub client_credentials_in: CredentialsIn,
    pub client_id_field: String,
    pub client_secret_field: String,
    /// Check the requested scope against the application's registered scopes.
    pub validate_scopes: bool,
}

impl Default for ApplicationValidationConfig {
    fn default() -> Self {
        ApplicationValidationConfig {
            client_credentials_in: CredentialsIn::AuthorizationHeader,
            client_id_field: "client_id".into(),
            client_secret_field: "client_secret".into(),
            validate_scopes: true,
        }
    }
}

pub struct ApplicationValidation {
    pub config: ApplicationValidationConfig,
    registry: SharedRegistry,
}

impl ApplicationValidation {
    /// The registry the clients are looked up in.
    pub fn registry(&self) -> &dyn store::ClientRegistry {
        &*self.registry
    }

    pub fn build(
        config: ApplicationValidationConfig,
        cx: &BuildContext,
    ) -> Result<Self, BuildError> {
        let registry = cx.registry("application_validation")?;
        if config.client_credentials_in == CredentialsIn::QueryString {
            cx.warn(
                "application_validation.client_credentials_in",
                "client credentials in the query string violate RFC 6749 §2.3.1 (they end up in access logs and proxies); use authorization_header or form_body",
            );
        }
        for (field, v) in [
            ("client_id_field", &config.client_id_field),
            ("client_secret_field", &config.client_secret_field),
        ] {
            if v.trim().is_empty() {
                return Err(BuildError::at(
                    &format!("application_validation.{field}"),
                    "must not be empty",
                ));
            }
        }
        Ok(ApplicationValidation { config, registry })
    }

    /// Authenticates the client. `Ok(Err(_))` is the OAuth error to answer; `Err(_)` means the
    /// registry could not be read.
    pub async fn authenticate(
        &self,
        ex: &Exchange,
        backend: &impl Backend,
    ) -> Result<Result<Arc<ClientApplication>, OAuthError>, FilterError> {
        let basic = self.config.client_credentials_in == CredentialsIn::AuthorizationHeader;
        let invalid = |d: &'static str, challenge: bool| {
            let mut e = OAuthError::new(ErrorCode::InvalidClient, d);
            e.basic_challenge = challenge;
            e
        };
        let bad_request = |d: &'static str| Ok(Err(OAuthError::new(ErrorCode::InvalidRequest, d)));
        // RFC 6749 §2.3: one authentication method per request. A second one is refused, not
        // ignored: a proxy in front may have acted on the one this filter would not read.
        let mut headers = ex.headers().get_all(http::header::AUTHORIZATION).iter();
        let header = headers.next();
        if headers.next().is_some() {
            return bad_request("repeated Authorization header");
        }
        let secret_field = self.config.client_secret_field.as_str();
        // Empty values count as omitted (RFC 6749 §3.1); any occurrence with a value counts as
        // sent (`client_secret=&client_secret=x` sends one).
        let secret_in_form = ex.form().values(secret_field).any(|v| !v.is_empty());
        let secret_in_query = ex.query().values(secret_field).any(|v| !v.is_empty());
        // Where Basic credentials are decoded to, when they are: the id and secret borrow it.
        let header_credentials;
        let (id, secret) = match self.config.client_credentials_in {
            CredentialsIn::AuthorizationHeader => {
                if secret_in_form || secret_in_query {
                    return bad_request(
                        "client credentials must be sent in the Authorization header only",
                    );
                }
                let Some(v) = header else {
                    return Ok(Err(invalid(
                        "client authentication required (HTTP Basic)",
                        true,
                    )));
                };
                header_credentials = parse_basic(v.as_bytes());
                match header_credentials.as_ref().and_then(Basic::credentials) {
                    Some(credentials) => credentials,
                    None => return Ok(Err(invalid("malformed Basic credentials", true))),
                }
            }
            CredentialsIn::FormBody | CredentialsIn::QueryString => {
                let (params, secret_elsewhere, only_here, not_header) =
                    if self.config.client_credentials_in == CredentialsIn::FormBody {
                        (
                            ex.form(),
                            secret_in_query,
                            "client credentials must be sent in the form body only",
                            "this endpoint takes client credentials in the form body",
                        )
                    } else {
                        (
                            ex.query(),
                            secret_in_form,
                            "client credentials must be sent in the query string only",
                            "this endpoint takes client credentials in the query string",
                        )
                    };
                if secret_elsewhere {
                    return bad_request(only_here);
                }
                let id = params.single(&self.config.client_id_field);
                let secret = params.single(secret_field);
                if id == Param::Repeated || secret == Param::Repeated {
                    return bad_request("repeated client credential parameter");
                }
                if header.is_some() {
                    if id.value().is_some() || secret.value().is_some() {
                        return bad_request("use one client authentication method, not several");
                    }
                    // The client tried the Authorization header alone: RFC 6749 §5.2 asks for
                    // a 401 with a challenge, whatever this endpoint accepts.
                    return Ok(Err(invalid(not_header, true)));
                }
                match (id.value(), secret.value()) {
                    (Some(i), Some(s)) => (Cow::Borrowed(i), Cow::Borrowed(s)),
                    _ => return Ok(Err(invalid("client authentication required", false))),
                }
            }
        };
        let Some(app) = backend.application(&id).await? else {
            return Ok(Err(invalid("client authentication failed", basic)));
        };
        // Verify even for a disabled client, so both answers cost the same.
        let secret_ok = app.verify_secret(&secret);
        if !secret_ok || !app.enabled {
            return Ok(Err(invalid("client authentication failed", basic)));
        }
        Ok(Ok(app))
    }
}

/// The grant a grant filter serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantType {
    RefreshToken,
    ClientCredentials,
}

impl GrantType {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::RefreshToken => "refresh_token",
            GrantType::ClientCredentials => "client_credentials",
        }
    }

    fn unsupported(self) -> &'static str {
        match self {
            GrantType::RefreshToken => "this endpoint serves grant_type=refresh_token",
            GrantType::ClientCredentials => "this endpoint serves grant_type=client_credentials",
        }
    }

    fn unauthorized(self) -> &'static str {
        match self {
            GrantType::RefreshToken => "this client may not use the refresh_token grant",
            GrantType::ClientCredentials => "this client may not use the client_credentials grant",
        }
    }
}

impl ApplicationValidation {
    /// What every grant filter starts with: a form body, the expected `grant_type`, and an
    /// authenticated, enabled client allowed to use that grant. On success the client id is
    /// set in `oauth.client_id` and in `client_attribute` (the monitoring settings' attribute
    /// that identifies the client). `Ok(Err(_))` is the OAuth error to answer.
    pub async fn admit(
        &self,
        ex: &mut Exchange,
        grant: GrantType,
        client_attribute: &'static str,
        backend: &impl Backend,
    ) -> Result<Result<Arc<ClientApplication>, OAuthError>, FilterError> {
        if !ex.is_form() {
            return Ok(Err(OAuthError::new(
                ErrorCode::InvalidRequest,
                "expected an application/x-www-form-urlencoded body",
            )));
        }
        match ex.form().single("grant_type") {
            Param::Value(v) if v == grant.as_str() => {}
            Param::Value(v) if !v.is_empty() => {
                return Ok(Err(OAuthError::new(
                    ErrorCode::UnsupportedGrantType,
                    grant.unsupported(),
                )));
            }
            Param::Repeated => {
                return Ok(Err(OAuthError::new(
                    ErrorCode::InvalidRequest,
                    "grant_type is repeated",
                )));
            }
            _ => {
                return Ok(Err(OAuthError::new(
                    ErrorCode::InvalidRequest,
                    "grant_type is missing",
                )));
            }
        }
        let app = match self.authenticate(ex, backend).await? {
            Ok(app) => app,
            Err(e) => return Ok(Err(e)),
        };
        // One copy of the id for both attributes; the attribute's name is the policy's.
        let id: Arc<str> = Arc::from(app.client_id.as_str());
        ex.set("oauth.client_id", id.clone());
        ex.set(client_attribute, id);
        if !app.allows_grant(grant.as_str()) {
            return Ok(Err(OAuthError::new(
                ErrorCode::UnauthorizedClient,
                grant.unauthorized(),
            )));
        }
        Ok(Ok(app))
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1 form-encodes both),
/// decoded into a buffer of its own: inline up to [`BASIC_INLINE`] bytes, so the usual client
/// id and secret cost no allocation. [`Basic::credentials`] reads them out of it.
pub fn parse_basic(value: &[u8]) -> Option<Basic> {
    let v = value.trim_ascii();
    let space = v.iter().position(|&b| b == b' ')?;
    if !v[..space].eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let encoded = v[space + 1..].trim_ascii();
    let mut decoded = SmallVec::new();
    decoded.resize(base64::decoded_len_estimate(encoded.len()), 0);
    let len = base64::engine::general_purpose::STANDARD
        .decode_slice(encoded, &mut decoded)
        .ok()?;
    decoded.truncate(len);
    Some(Basic { decoded })
}

/// Decoded Basic credentials up to this many bytes stay on the stack.
const BASIC_INLINE: usize = 192;

/// The decoded bytes of a Basic `Authorization` header ([`parse_basic`]).
pub struct Basic {
    decoded: SmallVec<[u8; BASIC_INLINE]>,
}

impl Basic {
    /// The client id and secret, each form-decoded: borrowed from the header's decoded bytes
    /// unless they had escapes. `None` when the credentials are not UTF-8, have no colon, or
    /// name no client.
    pub fn credentials(&self) -> Option<(Cow<'_, str>, Cow<'_, str>)> {
        let (id, secret) = std::str::from_utf8(&self.decoded).ok()?.split_once(':')?;
        let id = form_decode(id)?;
        if id.is_empty() {
            return None;
        }
        Some((id, form_decode(secret)?))
    }
}

fn form_decode(s: &str) -> Option<Cow<'_, str>> {
    match crate::attributes::unescape_form(s) {
        None => Some(Cow::Borrowed(s)),
        Some(bytes) => String::from_utf8(bytes).ok().map(Cow::Owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// The credentials of a Basic header, owned, or `None` wherever they are refused.
    fn basic(value: &[u8]) -> Option<(String, String)> {
        let b = parse_basic(value)?;
        let (id, secret) = b.credentials()?;
        Some((id.into_owned(), secret.into_owned()))
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let h = format!("Basic {}", b64("my%20app:p%3Ass+word"));
        assert_eq!(
            basic(h.as_bytes()),
            Some(("my app".into(), "p:ss word".into()))
        );
        // Longer than the inline buffer: the same answer from the heap.
        let long = "s".repeat(BASIC_INLINE * 2);
        let h = format!("Basic {}", b64(&format!("app:{long}")));
        assert_eq!(basic(h.as_bytes()), Some(("app".into(), long)));
        // Not UTF-8 once decoded: refused.
        let h = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(b"app:\xff")
        );
        assert_eq!(basic(h.as_bytes()), None);
        // Spaces around the credentials are trimmed; the scheme ends at a space.
        let h = format!("  Basic   {}  ", b64("app:pw"));
        assert_eq!(basic(h.as_bytes()), Some(("app".into(), "pw".into())));
        let h = format!("Basic\t{}", b64("app:pw"));
        assert_eq!(basic(h.as_bytes()), None);
        // Base64 as RFC 4648 writes it: padded, and padded once.
        let unpadded = b64("app:pwd").trim_end_matches('=').to_owned();
        assert_ne!(unpadded, b64("app:pwd"));
        assert_eq!(basic(format!("Basic {unpadded}").as_bytes()), None);
        let padded_twice = format!("Basic {}=", b64("app:pwd"));
        assert_eq!(basic(padded_twice.as_bytes()), None);
        let h = format!("basic {}", b64("id:sec:ret"));
        assert_eq!(basic(h.as_bytes()), Some(("id".into(), "sec:ret".into())));
    }

    #[test]
    fn malformed_basic_is_refused() {
        assert_eq!(basic(b"Bearer abc"), None);
        assert_eq!(basic(b"Basic !!!"), None);
        assert_eq!(basic(format!("Basic {}", b64("nocolon")).as_bytes()), None);
        assert_eq!(basic(format!("Basic {}", b64(":secret")).as_bytes()), None);
        assert_eq!(basic(b"Basic"), None);
    }
}
