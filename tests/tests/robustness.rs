//! Seeded, randomized (property-style) tests of two standards of the product.
//!
//! 1. A malformed request to the token endpoint (`POST /oauth/token` on the default
//!    `policies/token.yaml`) gets an RFC 6749 §5.2 error: 400, or 401 with a challenge for
//!    `invalid_client` when the client used the Authorization header; a JSON body whose `error`
//!    is one of §5.2's codes (and one that a defect of the request calls for);
//!    `Cache-Control: no-store`; never a 5xx, a panic or a hang; no secret or token echoed. And
//!    it changes nothing: the refresh token the storm aimed at still refreshes exactly once.
//! 2. A malformed policy file gets errors that name the file, a line in it and, where a key is
//!    involved, the key; a reload of a running gateway refuses it and keeps serving as before.
//!
//! Each test first walks every defect (or every key) once on its own, then draws random
//! combinations from a seeded generator. The seed is printed; `ROBUSTNESS_SEED=<u64>` replays a
//! run and `ROBUSTNESS_CASES=<n>` sets how many random cases follow the systematic ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::Full;
use rand::distr::{Alphanumeric, SampleString};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use tests::{
    PolicyDir, Resp, SETTINGS, add_client, basic, default_token_policy, post_form, post_reload,
};

// ---------------------------------------------------------------------------------------------
// Seeds and case counts

const DEFAULT_SEED: u64 = 0x5eed_2025_0a17;

/// The run's seed (printed, so that a failure can be replayed), mixed with `salt` so that each
/// test draws its own sequence.
fn seeded(test: &str, salt: u64) -> (u64, StdRng) {
    let seed = match std::env::var("ROBUSTNESS_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => s.parse().ok(),
            };
            parsed.unwrap_or_else(|| panic!("ROBUSTNESS_SEED={s:?} is not a u64"))
        }
        Err(_) => DEFAULT_SEED,
    };
    println!("{test}: seed {seed} (replay with ROBUSTNESS_SEED={seed})");
    (seed, StdRng::seed_from_u64(seed ^ salt))
}

/// How many random cases to draw after the systematic ones.
fn random_cases(default: usize) -> usize {
    match std::env::var("ROBUSTNESS_CASES") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("ROBUSTNESS_CASES={s:?} is not a count")),
        Err(_) => default,
    }
}

fn alnum(rng: &mut StdRng, len: usize) -> String {
    Alphanumeric.sample_string(rng, len)
}

// ---------------------------------------------------------------------------------------------
// Standard 1: the token endpoint

const TOKEN: &str = "/oauth/token";
const FORM: &str = "application/x-www-form-urlencoded";
/// RFC 6749 §5.2.
const RFC_6749_CODES: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
];

const IR: &[&str] = &["invalid_request"];
const IC: &[&str] = &["invalid_client"];
const IG: &[&str] = &["invalid_grant"];
const UC: &[&str] = &["unauthorized_client"];
const UGT: &[&str] = &["unsupported_grant_type"];
const IS: &[&str] = &["invalid_scope"];
/// A grant type with a line break fails the policy's `matches: "^.+$"` and is answered as
/// missing (invalid_request); unsupported_grant_type would be as right.
const IR_OR_UGT: &[&str] = &["invalid_request", "unsupported_grant_type"];
const VALID: &[&str] = &[];

struct Client {
    id: String,
    secret: String,
}

/// The clients and tokens the storm plays with.
struct World {
    /// Registered for `read write admin` and both grants: the owner of every token below
    /// but `rt_b`.
    a: Client,
    /// Registered like `a`: a valid client, but not the owner of `a`'s tokens.
    b: Client,
    /// Registered without the refresh grant.
    c: Client,
    /// `b`'s refresh token.
    rt_b: String,
    /// `a`'s refresh token of another family, already rotated once.
    rt_used: String,
    /// `a`'s access token (of the storm's own family).
    at0: String,
}

/// One request of the storm, as sent.
#[derive(Default)]
struct Case {
    labels: Vec<&'static str>,
    /// `name=value` pieces of the query string, already percent-encoded.
    query: Vec<String>,
    content_type: Option<Vec<u8>>,
    authorization: Vec<Vec<u8>>,
    /// `name=value` pieces of the body, as sent (joined with `&`).
    fields: Vec<Vec<u8>>,
    /// The error codes that the defects of this request call for; empty: a valid request.
    expect: BTreeSet<&'static str>,
    /// For a valid request: the scope the answer must carry.
    scope: Option<String>,
    /// Values that must not come back in an answer, beside the world's secrets and tokens.
    secrets: Vec<String>,
}

impl Case {
    fn field(&mut self, name: &str, value: &str) {
        self.fields
            .push(format!("{}={}", enc(name), enc(value)).into_bytes());
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.fields.push(bytes.to_vec());
    }

    fn query(&mut self, name: &str, value: &str) {
        self.query.push(format!("{}={}", enc(name), enc(value)));
    }

    fn auth(&mut self, value: impl AsRef<[u8]>) {
        self.authorization.push(value.as_ref().to_vec());
    }

    fn path(&self) -> String {
        if self.query.is_empty() {
            TOKEN.to_owned()
        } else {
            format!("{TOKEN}?{}", self.query.join("&"))
        }
    }

    fn body(&self) -> Vec<u8> {
        self.fields.join(&b'&')
    }

    fn describe(&self) -> String {
        let auth: Vec<String> = self
            .authorization
            .iter()
            .map(|a| String::from_utf8_lossy(&a[..a.len().min(120)]).into_owned())
            .collect();
        let body = self.body();
        format!(
            "[{}]\n  POST {}\n  content-type: {:?}\n  authorization: {auth:?}\n  body ({} bytes): {:?}",
            self.labels.join(", "),
            abbreviate(&self.path()),
            self.content_type
                .as_ref()
                .map(|c| String::from_utf8_lossy(c).into_owned()),
            body.len(),
            abbreviate(&String::from_utf8_lossy(&body)),
        )
    }
}

fn abbreviate(s: &str) -> String {
    if s.chars().count() <= 400 {
        s.to_owned()
    } else {
        let head: String = s.chars().take(400).collect();
        format!("{head}... ({} chars)", s.chars().count())
    }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Every byte as `%XX`: the same value once decoded.
fn escape_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What a treatment may read besides the case: the world and the refresh token that a valid
/// request of this case would present.
struct Cx<'a> {
    w: &'a World,
    target: &'a str,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    ContentType,
    GrantType,
    Authorization,
    ExtraCredentials,
    RefreshToken,
    Scope,
}

/// One way of filling one part of a request: valid (`codes` empty) or a defect that calls for
/// one of `codes`.
struct Treatment {
    slot: Slot,
    label: &'static str,
    codes: &'static [&'static str],
    apply: fn(&Cx, &mut StdRng, &mut Case),
}

macro_rules! t {
    ($slot:ident, $label:literal, $codes:expr, $apply:expr) => {
        Treatment {
            slot: Slot::$slot,
            label: $label,
            codes: $codes,
            apply: $apply,
        }
    };
}

fn treatments() -> Vec<Treatment> {
    vec![
        // Content-Type.
        t!(ContentType, "form content-type", VALID, |_, _, c| {
            c.content_type = Some(FORM.into())
        }),
        t!(
            ContentType,
            "form content-type with charset",
            VALID,
            |_, _, c| { c.content_type = Some(format!("{FORM}; charset=UTF-8").into_bytes()) }
        ),
        t!(
            ContentType,
            "form content-type in capitals",
            VALID,
            |_, _, c| { c.content_type = Some(FORM.to_ascii_uppercase().into_bytes()) }
        ),
        t!(ContentType, "no content-type", IR, |_, _, c| c
            .content_type =
            None),
        t!(ContentType, "empty content-type", IR, |_, _, c| {
            c.content_type = Some(Vec::new())
        }),
        t!(ContentType, "another content-type", IR, |_, r, c| {
            let other = [
                "application/json",
                "text/plain",
                "multipart/form-data; boundary=xyz",
                "application/x-www-form-urlencodedx",
                "application/octet-stream",
                "x-www-form-urlencoded",
            ];
            c.content_type = Some(other.choose(r).unwrap().as_bytes().to_vec());
        }),
        t!(ContentType, "non-UTF-8 content-type", IR, |_, _, c| {
            let mut v = FORM.as_bytes().to_vec();
            v.push(0xff);
            c.content_type = Some(v);
        }),
        // grant_type.
        t!(GrantType, "grant_type", VALID, |_, _, c| c
            .field("grant_type", "refresh_token")),
        t!(GrantType, "grant_type percent-encoded", VALID, |_, r, c| {
            if r.random_bool(0.5) {
                c.raw(b"grant%5Ftype=refresh%5Ftoken");
            } else {
                c.raw(format!("grant_type={}", escape_all("refresh_token")).as_bytes());
            }
        }),
        t!(GrantType, "grant_type missing", IR, |_, _, _| {}),
        t!(GrantType, "grant_type empty", IR, |_, r, c| {
            c.raw(if r.random_bool(0.5) {
                b"grant_type="
            } else {
                b"grant_type"
            })
        }),
        t!(GrantType, "grant_type repeated", IR, |_, _, c| {
            c.field("grant_type", "refresh_token");
            c.field("grant_type", "refresh_token");
        }),
        t!(
            GrantType,
            "grant_type repeated with client_credentials",
            IR,
            |_, r, c| {
                let mut two = ["refresh_token", "client_credentials"];
                two.shuffle(r);
                for g in two {
                    c.field("grant_type", g);
                }
            }
        ),
        // Whichever comes first (repeated_grant_type_is_invalid_request_whatever_comes_first).
        t!(
            GrantType,
            "grant_type repeated with an unsupported one",
            IR,
            |_, r, c| {
                let mut two = ["refresh_token", "password"];
                two.shuffle(r);
                for g in two {
                    c.field("grant_type", g);
                }
            }
        ),
        t!(GrantType, "grant_type unsupported", UGT, |_, r, c| {
            let other = [
                "password",
                "authorization_code",
                "client_credentialz",
                "REFRESH_TOKEN",
                "refresh-token",
                "refresh_token ",
                " refresh_token",
                "refresh_token\u{0}",
                "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "urn:ietf:params:oauth:grant-type:device_code",
                "r\u{e9}fresh_token",
            ];
            let g = if r.random_bool(0.2) {
                let len = r.random_range(1..40);
                alnum(r, len)
            } else {
                (*other.choose(r).unwrap()).to_owned()
            };
            c.field("grant_type", &g);
        }),
        t!(GrantType, "grant_type huge", UGT, |_, r, c| {
            c.field("grant_type", &"x".repeat(r.random_range(1_000..8_000)))
        }),
        t!(GrantType, "grant_type non-UTF-8", UGT, |_, r, c| {
            let bad: &[u8] = [
                &b"refresh_token\xff"[..],
                b"\xc3refresh_token",
                b"refresh\x80token",
            ]
            .choose(r)
            .unwrap();
            c.raw(&[&b"grant_type="[..], bad].concat());
        }),
        t!(
            GrantType,
            "grant_type bad percent-encoding",
            UGT,
            |_, r, c| {
                let bad = [
                    "refresh_token%",
                    "refresh%ZZtoken",
                    "refresh_token%2",
                    "%%refresh_token",
                ];
                c.raw(format!("grant_type={}", bad.choose(r).unwrap()).as_bytes());
            }
        ),
        t!(
            GrantType,
            "grant_type with a line break",
            IR_OR_UGT,
            |_, r, c| {
                let bad = [
                    "refresh_token%0A",
                    "%0Arefresh_token",
                    "refresh_token%0D%0A",
                ];
                c.raw(format!("grant_type={}", bad.choose(r).unwrap()).as_bytes());
            }
        ),
        // Authorization.
        t!(Authorization, "Basic", VALID, |x, _, c| c
            .auth(basic(&x.w.a.id, &x.w.a.secret))),
        t!(
            Authorization,
            "Basic in lower case, extra spaces",
            VALID,
            |x, r, c| {
                let creds = b64(format!("{}:{}", x.w.a.id, x.w.a.secret).as_bytes());
                let scheme = ["basic", "BASIC", "bAsIc"].choose(r).unwrap();
                c.auth(format!("{scheme}   {creds}"));
            }
        ),
        t!(Authorization, "no Authorization", IC, |_, _, _| {}),
        t!(Authorization, "Basic, not base64", IC, |_, r, c| {
            let bad = ["!!notbase64", "****", "====", "YWJj ZGVm", "YWJjZA", "-_-_"];
            c.auth(format!("Basic {}", bad.choose(r).unwrap()));
        }),
        t!(Authorization, "Basic, unpadded base64", IC, |x, _, c| {
            // id (24) + ':' + secret (48) = 73 bytes: the encoding ends in "==".
            let creds = b64(format!("{}:{}", x.w.a.id, x.w.a.secret).as_bytes());
            assert!(creds.ends_with('='));
            c.auth(format!("Basic {}", creds.trim_end_matches('=')));
        }),
        t!(Authorization, "Basic, no colon", IC, |x, _, c| {
            c.auth(format!(
                "Basic {}",
                b64(format!("{}{}", x.w.a.id, x.w.a.secret).as_bytes())
            ))
        }),
        t!(Authorization, "Basic, empty id", IC, |x, _, c| {
            c.auth(format!(
                "Basic {}",
                b64(format!(":{}", x.w.a.secret).as_bytes())
            ))
        }),
        t!(Authorization, "Basic, empty secret", IC, |x, _, c| {
            c.auth(format!(
                "Basic {}",
                b64(format!("{}:", x.w.a.id).as_bytes())
            ))
        }),
        t!(Authorization, "Basic, wrong secret", IC, |x, r, c| {
            let wrong = alnum(r, 48);
            c.auth(basic(&x.w.a.id, &wrong));
            c.secrets.push(wrong);
        }),
        t!(
            Authorization,
            "Basic, secret of another client",
            IC,
            |x, _, c| c.auth(basic(&x.w.a.id, &x.w.b.secret))
        ),
        t!(
            Authorization,
            "Basic, the refresh token as secret",
            IC,
            |x, _, c| c.auth(basic(&x.w.a.id, x.target))
        ),
        t!(Authorization, "Basic, unknown client", IC, |x, r, c| {
            c.auth(basic(&alnum(r, 24), &x.w.a.secret))
        }),
        t!(
            Authorization,
            "Basic, not UTF-8 once decoded",
            IC,
            |x, _, c| {
                let mut creds = format!("{}:", x.w.a.id).into_bytes();
                creds.extend_from_slice(b"\xff\xfe");
                c.auth(format!("Basic {}", b64(&creds)));
            }
        ),
        t!(Authorization, "Basic, obs-text byte", IC, |x, _, c| {
            let mut v = basic(&x.w.a.id, &x.w.a.secret).into_bytes();
            v.push(0xff);
            c.auth(v);
        }),
        t!(Authorization, "Basic, no credentials", IC, |_, r, c| {
            c.auth(*["Basic", "Basic ", "Basic    "].choose(r).unwrap())
        }),
        t!(
            Authorization,
            "Basic, a tab after the scheme",
            IC,
            |x, _, c| {
                let creds = b64(format!("{}:{}", x.w.a.id, x.w.a.secret).as_bytes());
                c.auth(format!("Basic\t{creds}"));
            }
        ),
        t!(Authorization, "another scheme", IC, |x, r, c| {
            let creds = b64(format!("{}:{}", x.w.a.id, x.w.a.secret).as_bytes());
            let v = match r.random_range(0..4) {
                0 => format!("Bearer {}", x.w.at0),
                1 => format!("Digest username=\"{}\", realm=\"oauth\"", x.w.a.id),
                2 => format!("Basicx {creds}"),
                _ => creds,
            };
            c.auth(v);
        }),
        t!(Authorization, "Basic, huge", IC, |x, r, c| {
            let secret = "s".repeat(r.random_range(2_000..8_500));
            c.auth(basic(&x.w.a.id, &secret));
        }),
        t!(
            Authorization,
            "client without the refresh grant",
            UC,
            |x, _, c| c.auth(basic(&x.w.c.id, &x.w.c.secret))
        ),
        t!(Authorization, "another client", IG, |x, _, c| c
            .auth(basic(&x.w.b.id, &x.w.b.secret))),
        t!(Authorization, "Authorization twice", IR, |x, r, c| {
            let other = if r.random_bool(0.5) { &x.w.a } else { &x.w.b };
            c.auth(basic(&x.w.a.id, &x.w.a.secret));
            c.auth(basic(&other.id, &other.secret));
            c.authorization.shuffle(r);
        }),
        // Client credentials beside the header.
        t!(
            ExtraCredentials,
            "no extra credentials",
            VALID,
            |_, _, _| {}
        ),
        t!(
            ExtraCredentials,
            "client_id in the body",
            VALID,
            |x, _, c| c.field("client_id", &x.w.a.id)
        ),
        t!(
            ExtraCredentials,
            "empty client_secret in the body",
            VALID,
            |_, _, c| c.raw(b"client_secret=")
        ),
        t!(
            ExtraCredentials,
            "client_id in the query",
            VALID,
            |x, _, c| c.query("client_id", &x.w.a.id)
        ),
        t!(
            ExtraCredentials,
            "client_secret in the body",
            IR,
            |x, r, c| {
                if r.random_bool(0.5) {
                    c.field("client_id", &x.w.a.id);
                }
                c.field("client_secret", &x.w.a.secret);
            }
        ),
        t!(
            ExtraCredentials,
            "wrong client_secret in the body",
            IR,
            |_, r, c| {
                let wrong = alnum(r, 48);
                c.field("client_secret", &wrong);
                c.secrets.push(wrong);
            }
        ),
        t!(
            ExtraCredentials,
            "client_secret twice in the body",
            IR,
            |x, _, c| {
                c.field("client_secret", &x.w.a.secret);
                c.field("client_secret", &x.w.a.secret);
            }
        ),
        t!(
            ExtraCredentials,
            "client_secret in the query",
            IR,
            |x, r, c| {
                if r.random_bool(0.5) {
                    c.query("client_id", &x.w.a.id);
                }
                c.query("client_secret", &x.w.a.secret);
            }
        ),
        // refresh_token.
        t!(RefreshToken, "refresh_token", VALID, |x, _, c| c
            .field("refresh_token", x.target)),
        t!(
            RefreshToken,
            "refresh_token percent-encoded",
            VALID,
            |x, _, c| { c.raw(format!("refresh_token={}", escape_all(x.target)).as_bytes()) }
        ),
        t!(RefreshToken, "refresh_token missing", IR, |_, _, _| {}),
        t!(RefreshToken, "refresh_token empty", IR, |_, r, c| {
            c.raw(if r.random_bool(0.5) {
                b"refresh_token="
            } else {
                b"refresh_token"
            })
        }),
        t!(RefreshToken, "refresh_token repeated", IR, |x, r, c| {
            let other = if r.random_bool(0.5) {
                x.target.to_owned()
            } else {
                alnum(r, 46)
            };
            c.field("refresh_token", x.target);
            c.field("refresh_token", &other);
        }),
        t!(RefreshToken, "refresh_token unknown", IG, |_, r, c| {
            let len = r.random_range(1..80);
            let t = alnum(r, len);
            c.field("refresh_token", &t);
        }),
        t!(RefreshToken, "refresh_token altered", IG, |x, r, c| {
            let t = x.target;
            let altered = match r.random_range(0..5) {
                0 => t[..t.len() - 1].to_owned(),
                1 => format!("{t}x"),
                2 => t
                    .chars()
                    .map(|ch| {
                        if ch.is_ascii_lowercase() {
                            ch.to_ascii_uppercase()
                        } else {
                            ch.to_ascii_lowercase()
                        }
                    })
                    .collect(),
                3 => format!(" {t}"),
                _ => format!("{t}\u{0}"),
            };
            c.field("refresh_token", &altered);
        }),
        t!(
            RefreshToken,
            "refresh_token bad percent-encoding",
            IG,
            |x, r, c| {
                let t = x.target;
                let at = r.random_range(0..=t.len());
                let bad = ["%", "%ZZ", "%2", "+"].choose(r).unwrap();
                c.raw(format!("refresh_token={}{bad}{}", &t[..at], &t[at..]).as_bytes());
            }
        ),
        t!(RefreshToken, "refresh_token non-UTF-8", IG, |x, r, c| {
            let t = x.target.as_bytes();
            let at = r.random_range(0..=t.len());
            c.raw(&[&b"refresh_token="[..], &t[..at], b"\xff", &t[at..]].concat());
        }),
        t!(
            RefreshToken,
            "refresh_token of another client",
            IG,
            |x, _, c| c.field("refresh_token", &x.w.rt_b)
        ),
        t!(RefreshToken, "refresh_token already used", IG, |x, _, c| c
            .field("refresh_token", &x.w.rt_used)),
        t!(
            RefreshToken,
            "an access token as refresh_token",
            IG,
            |x, _, c| c.field("refresh_token", &x.w.at0)
        ),
        t!(RefreshToken, "refresh_token huge", IG, |_, r, c| {
            c.field("refresh_token", &"a".repeat(r.random_range(10_000..30_000)))
        }),
        // scope (the storm's token was granted `read write`; `a` is registered for more).
        t!(Scope, "scope omitted", VALID, |_, _, _| {}),
        t!(Scope, "scope empty", VALID, |_, _, c| {
            c.raw(b"scope=");
            c.scope = Some("read write".into());
        }),
        t!(Scope, "scope as granted", VALID, |_, r, c| {
            let s = ["read write", "write read", "read  write"]
                .choose(r)
                .unwrap();
            c.field("scope", s);
            c.scope = Some("read write".into());
        }),
        t!(Scope, "scope narrowed", VALID, |_, r, c| {
            let s = *["read", "write"].choose(r).unwrap();
            c.field("scope", s);
            c.scope = Some(s.into());
        }),
        t!(Scope, "scope wider than the grant", IS, |_, r, c| {
            let s = ["read write admin", "admin", "read admin"]
                .choose(r)
                .unwrap();
            c.field("scope", s);
        }),
        t!(Scope, "scope never registered", IS, |_, r, c| {
            c.field("scope", ["delete", "read delete", "*"].choose(r).unwrap())
        }),
        t!(Scope, "scope malformed", IS, |_, r, c| {
            let s = [
                "read \"x\"",
                "caf\u{e9}",
                "read\twrite",
                "read\\write",
                "read\nwrite",
            ];
            c.field("scope", s.choose(r).unwrap());
        }),
        t!(Scope, "scope non-UTF-8", IS, |_, _, c| c
            .raw(b"scope=read\xff")),
        t!(Scope, "scope huge", IS, |_, r, c| {
            c.field("scope", &"x".repeat(r.random_range(1_000..8_000)))
        }),
        t!(Scope, "scope repeated", IR, |_, _, c| {
            c.field("scope", "read");
            c.field("scope", "read");
        }),
    ]
}

/// What a request may carry besides its treatments without changing its answer: unknown
/// parameters (RFC 6749 §3.2: ignored), empty pairs, a byte that is not UTF-8 in an unknown
/// name, padding, parameters in the query that the endpoint does not read.
fn add_noise(r: &mut StdRng, c: &mut Case) {
    for _ in 0..r.random_range(0..3) {
        match r.random_range(0..8) {
            0 => c.field("foo", "bar"),
            1 => c.field("redirect_uri", "https://client.example/cb"),
            2 => c.raw(b""),
            3 => c.raw(b"=orphan"),
            4 => c.raw(b"x\xff=1"),
            5 => c.field("pad", &"p".repeat(r.random_range(100..8_000))),
            6 => c.query("grant_type", "password"),
            _ => {
                let t = alnum(r, 46);
                c.query("refresh_token", &t);
            }
        }
    }
}

/// Builds a case from one treatment per slot.
fn build_case(cx: &Cx, r: &mut StdRng, chosen: &[&Treatment], noise: bool) -> Case {
    let mut c = Case::default();
    for t in chosen {
        (t.apply)(cx, r, &mut c);
        c.labels.push(t.label);
        c.expect.extend(t.codes);
    }
    if noise {
        add_noise(r, &mut c);
        c.fields.shuffle(r);
    }
    if c.expect.is_empty() && c.scope.is_none() {
        c.scope = Some("read write".into());
    }
    c
}

const SLOTS: [Slot; 6] = [
    Slot::ContentType,
    Slot::GrantType,
    Slot::Authorization,
    Slot::ExtraCredentials,
    Slot::RefreshToken,
    Slot::Scope,
];

/// The treatments of `slot`: (valid ones, defects).
fn of_slot(all: &[Treatment], slot: Slot) -> (Vec<&Treatment>, Vec<&Treatment>) {
    all.iter()
        .filter(|t| t.slot == slot)
        .partition(|t| t.codes.is_empty())
}

/// Valid client `b` with `b`'s own refresh token would be a valid request: never drawn.
fn compatible(chosen: &[&Treatment]) -> bool {
    let has = |l: &str| chosen.iter().any(|t| t.label == l);
    !(has("another client") && has("refresh_token of another client"))
}

struct Outcome {
    code: String,
}

/// Sends `case` and checks what every answer of the token endpoint must satisfy; returns the
/// error code (or "ok").
async fn send_case(
    gw: &tests::Gateway,
    w: &World,
    case: &Case,
    extra: &[&str],
    seed: u64,
) -> Outcome {
    let mut b = tests::request(Method::POST, &case.path());
    if let Some(ct) = &case.content_type {
        b = b.header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_bytes(ct).expect("content-type bytes"),
        );
    }
    for a in &case.authorization {
        b = b.header(
            http::header::AUTHORIZATION,
            HeaderValue::from_bytes(a).expect("authorization bytes"),
        );
    }
    let req = b.body(Full::new(Bytes::from(case.body()))).unwrap();
    let addr = gw.public_addr;
    let what = format!("seed {seed}: {}", case.describe());
    // A fresh connection per request (tests::send); a hang or a dropped connection is a failure
    // of this case, not a timeout of the whole test.
    let r = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::spawn(tests::send(addr, req)),
    )
    .await
    {
        Err(_) => panic!("no answer within 10 s to {what}"),
        Ok(Err(e)) => panic!("the exchange broke ({e}) for {what}"),
        Ok(Ok(r)) => r,
    };
    check_answer(w, case, &r, extra, &what)
}

fn check_answer(w: &World, case: &Case, r: &Resp, extra: &[&str], what: &str) -> Outcome {
    let text = r.text();
    let ctx = || {
        format!(
            "{what}\n  answered {} {:?} {}",
            r.status,
            r.headers,
            abbreviate(&text)
        )
    };
    assert!(!r.status.is_server_error(), "5xx: {}", ctx());
    // Nothing sent comes back: the secrets, the tokens, and the case's own random values.
    let mut secret: Vec<&str> = vec![
        &w.a.secret,
        &w.b.secret,
        &w.c.secret,
        &w.rt_b,
        &w.rt_used,
        &w.at0,
    ];
    secret.extend(extra);
    secret.extend(case.secrets.iter().map(String::as_str));
    for s in secret {
        assert!(!text.contains(s), "the answer echoes {s:?}: {}", ctx());
        for (name, v) in &r.headers {
            assert!(
                !String::from_utf8_lossy(v.as_bytes()).contains(s),
                "header {name} echoes {s:?}: {}",
                ctx()
            );
        }
    }
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "Cache-Control: {}",
        ctx()
    );
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "Content-Type: {}",
        ctx()
    );
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", ctx()));
    if case.expect.is_empty() {
        assert_eq!(r.status, StatusCode::OK, "a valid request: {}", ctx());
        for k in ["access_token", "refresh_token"] {
            assert!(
                json[k].as_str().is_some_and(|t| t.len() >= 22),
                "{k}: {}",
                ctx()
            );
        }
        assert_eq!(json["token_type"], "Bearer", "{}", ctx());
        assert_eq!(
            json["scope"].as_str(),
            case.scope.as_deref(),
            "scope: {}",
            ctx()
        );
        return Outcome { code: "ok".into() };
    }
    let code = json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no `error` string: {}", ctx()));
    assert!(
        RFC_6749_CODES.contains(&code),
        "{code:?} is not an RFC 6749 §5.2 code: {}",
        ctx()
    );
    assert!(
        case.expect.contains(code),
        "{code:?}, where the defects call for one of {:?}: {}",
        case.expect,
        ctx()
    );
    // RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E.
    if let Some(d) = json.get("error_description") {
        let d = d
            .as_str()
            .unwrap_or_else(|| panic!("error_description not a string: {}", ctx()));
        assert!(
            d.bytes()
                .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E)),
            "error_description outside RFC 6749 §5.2's characters: {}",
            ctx()
        );
    }
    let challenge = r.header("www-authenticate");
    if code == "invalid_client" && !case.authorization.is_empty() {
        // The client tried the Authorization header: 401 with a Basic challenge.
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", ctx());
        assert!(
            challenge.is_some_and(|c| c.to_ascii_lowercase().starts_with("basic")),
            "a Basic challenge: {}",
            ctx()
        );
    } else if code == "invalid_client" {
        // No header: a 400, or a 401 with a challenge (RFC 6749 §5.2's MAY).
        assert!(
            r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::UNAUTHORIZED,
            "{}",
            ctx()
        );
    } else {
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", ctx());
    }
    if r.status == StatusCode::UNAUTHORIZED {
        assert!(
            challenge.is_some(),
            "a 401 without WWW-Authenticate: {}",
            ctx()
        );
    }
    Outcome { code: code.into() }
}

struct Endpoint {
    _dir: PolicyDir,
    gw: tests::Gateway,
    w: World,
}

async fn grant(gw: &tests::Gateway, who: &Client, form: &[(&str, &str)]) -> serde_json::Value {
    let r = post_form(
        gw.public_addr,
        TOKEN,
        &[("authorization", &basic(&who.id, &who.secret))],
        form,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
        .to_owned()
}

/// A pair for `who` through client credentials.
async fn pair(gw: &tests::Gateway, who: &Client, scope: &str) -> (String, String) {
    let v = grant(
        gw,
        who,
        &[("grant_type", "client_credentials"), ("scope", scope)],
    )
    .await;
    (s(&v, "access_token"), s(&v, "refresh_token"))
}

async fn refresh(gw: &tests::Gateway, who: &Client, rt: &str) -> Resp {
    post_form(
        gw.public_addr,
        TOKEN,
        &[("authorization", &basic(&who.id, &who.secret))],
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
    )
    .await
}

/// The default token endpoint, three clients, and every token but the storm's target.
async fn endpoint() -> (Endpoint, String) {
    let dir = PolicyDir::new(&[
        ("gateway.yaml", SETTINGS),
        ("token.yaml", &default_token_policy()),
    ]);
    let both = "client_credentials,refresh_token";
    let (id, secret) = add_client(dir.path(), "read write admin", both).await;
    let a = Client { id, secret };
    let (id, secret) = add_client(dir.path(), "read write admin", both).await;
    let b = Client { id, secret };
    let (id, secret) = add_client(dir.path(), "read write admin", "client_credentials").await;
    let c = Client { id, secret };
    let gw = dir.start().await;
    let (at0, rt0) = pair(&gw, &a, "read write").await;
    let (_, rt_b) = pair(&gw, &b, "read write").await;
    let (_, rt_used) = pair(&gw, &a, "read").await;
    let r = refresh(&gw, &a, &rt_used).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let w = World {
        a,
        b,
        c,
        rt_b,
        rt_used,
        at0,
    };
    (Endpoint { _dir: dir, gw, w }, rt0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_token_requests_get_rfc_6749_errors_and_change_nothing() {
    let (seed, mut rng) = seeded("token storm", 0x70c3);
    let n_random = random_cases(400);
    let started = Instant::now();
    let (e, rt0) = endpoint().await;
    let (gw, w) = (&e.gw, &e.w);
    let all = treatments();
    let slots: Vec<(Vec<&Treatment>, Vec<&Treatment>)> =
        SLOTS.iter().map(|&s| of_slot(&all, s)).collect();
    let canonical: Vec<&Treatment> = slots.iter().map(|(valid, _)| valid[0]).collect();
    let storm = Cx { w, target: &rt0 };
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut sent = 0;
    let mut valid_controls = 0;

    // A valid request (on a token of its own, so the storm's target stays untouched) with the
    // given treatments: proves that the valid variants and the noise really are valid.
    let control = async |rng: &mut StdRng, chosen: &[&Treatment]| {
        let (_, rt) = pair(gw, &w.a, "read write").await;
        let cx = Cx { w, target: &rt };
        let case = build_case(&cx, rng, chosen, true);
        let out = send_case(gw, w, &case, &[&rt0], seed).await;
        assert_eq!(out.code, "ok", "seed {seed}");
    };

    // 1. Every valid variant alone (with noise): answered 200.
    for (si, (valid, _)) in slots.iter().enumerate() {
        for t in valid {
            let mut chosen = canonical.clone();
            chosen[si] = t;
            control(&mut rng, &chosen).await;
            valid_controls += 1;
        }
    }

    // 2. Every defect alone, aimed at the storm's token: exactly its own code.
    for (si, (_, defects)) in slots.iter().enumerate() {
        for t in defects {
            let mut chosen = canonical.clone();
            chosen[si] = t;
            let case = build_case(&storm, &mut rng, &chosen, false);
            let out = send_case(gw, w, &case, &[&rt0], seed).await;
            *codes.entry(out.code).or_default() += 1;
            sent += 1;
        }
    }

    // 3. Random combinations: one to three defects, valid variants elsewhere, noise; one in
    // eight a valid control instead.
    for i in 0..n_random {
        if i % 8 == 7 {
            let chosen: Vec<&Treatment> = slots
                .iter()
                .map(|(valid, _)| *valid.choose(&mut rng).unwrap())
                .collect();
            control(&mut rng, &chosen).await;
            valid_controls += 1;
            continue;
        }
        let chosen = loop {
            let defective: BTreeSet<usize> = (0..rng.random_range(1..=3))
                .map(|_| rng.random_range(0..SLOTS.len()))
                .collect();
            let chosen: Vec<&Treatment> = slots
                .iter()
                .enumerate()
                .map(|(si, (valid, defects))| {
                    let pool = if defective.contains(&si) {
                        defects
                    } else {
                        valid
                    };
                    *pool.choose(&mut rng).unwrap()
                })
                .collect();
            if compatible(&chosen) {
                break chosen;
            }
        };
        let case = build_case(&storm, &mut rng, &chosen, true);
        let out = send_case(gw, w, &case, &[&rt0], seed).await;
        *codes.entry(out.code).or_default() += 1;
        sent += 1;
    }

    // Nothing changed: the engine is healthy, the storm's family is intact (its access token
    // live), and its refresh token refreshes exactly once with its own client.
    let health = tests::get(gw.admin_addr, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text());
    let store = gw.state.runtime.load().stores["tokens"].store.clone();
    let live = store
        .access_token(&store.token_digest(&w.at0), store::now())
        .await
        .expect("store");
    assert!(
        live.is_some(),
        "seed {seed}: the storm revoked the target's family"
    );
    let r = refresh(gw, &w.a, &rt0).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "seed {seed}: the storm's target no longer refreshes: {}",
        r.text()
    );
    assert_eq!(r.json()["scope"], "read write", "seed {seed}");
    let again = refresh(gw, &w.a, &rt0).await;
    assert_eq!(
        again.status,
        StatusCode::BAD_REQUEST,
        "seed {seed}: {}",
        again.text()
    );
    assert_eq!(again.json()["error"], "invalid_grant", "seed {seed}");
    // `b`'s token, presented by `a` in the storm, is still `b`'s.
    let r = refresh(gw, &w.b, &w.rt_b).await;
    assert_eq!(r.status, StatusCode::OK, "seed {seed}: {}", r.text());

    println!(
        "token storm: {sent} malformed requests ({} systematic, {n_random} drawn, one in eight of those a valid control), {valid_controls} valid controls, answers {codes:?}, {:.1?}",
        slots.iter().map(|(_, d)| d.len()).sum::<usize>(),
        started.elapsed()
    );
}

/// RFC 6749 §3.2: "Request and response parameters MUST NOT be included more than once", and
/// §5.2 names the answer: invalid_request ("... repeats a parameter ..."). The default policy
/// dispatches on `http.form.grant_type`, which has no value when the field is repeated, so the
/// request takes the policy's invalid_request path whichever value comes first. (It was
/// answered unsupported_grant_type when `http.form.NAME` read the first value and that value
/// was unsupported.)
#[tokio::test]
async fn repeated_grant_type_is_invalid_request_whatever_comes_first() {
    let (e, rt0) = endpoint().await;
    let auth = basic(&e.w.a.id, &e.w.a.secret);
    for (first, second) in [
        ("refresh_token", "password"),
        ("password", "refresh_token"),
        ("client_credentials", "refresh_token"),
        ("password", "password"),
    ] {
        let r = post_form(
            e.gw.public_addr,
            TOKEN,
            &[("authorization", &auth)],
            &[
                ("grant_type", first),
                ("grant_type", second),
                ("refresh_token", &rt0),
            ],
        )
        .await;
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "grant_type={first}&grant_type={second}: {}",
            r.text()
        );
    }
    let r = refresh(&e.gw, &e.w.a, &rt0).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// Standard 2: policy files

/// A `key: value` line of block YAML.
struct KeyLine {
    /// Column (0-based) of the key.
    col: usize,
    key: String,
    /// Byte offset just past the `:`.
    colon_end: usize,
    /// What follows the `:`, trimmed (comments included).
    value: String,
}

fn key_line(line: &str) -> Option<KeyLine> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    let mut rest = &line[indent..];
    let mut col = indent;
    if let Some(r) = rest.strip_prefix("- ") {
        rest = r;
        col += 2;
    }
    let key_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    if key_len == 0 || !rest[key_len..].starts_with(':') {
        return None;
    }
    let after = &rest[key_len + 1..];
    if !(after.is_empty() || after.starts_with(' ')) {
        return None;
    }
    Some(KeyLine {
        col,
        key: rest[..key_len].to_owned(),
        colon_end: col + key_len + 1,
        value: after.trim().to_owned(),
    })
}

/// The key of the mapping that holds the key on line `i` (0-based), if any.
fn parent_key(lines: &[&str], i: usize) -> Option<String> {
    let col = key_line(lines[i])?.col;
    lines[..i]
        .iter()
        .rev()
        .filter_map(|l| key_line(l))
        .find(|k| k.col < col)
        .map(|k| k.key)
}

/// The first line (0-based) of the block mapping that holds the key on line `i`.
fn mapping_start(lines: &[&str], i: usize) -> usize {
    let Some(k) = lines.get(i).and_then(|l| key_line(l)) else {
        return i;
    };
    let is_item = |l: &str| l.trim_start().starts_with("- ");
    if is_item(lines[i]) {
        return i;
    }
    let mut first = i;
    for j in (0..i).rev() {
        match key_line(lines[j]) {
            Some(p) if p.col == k.col => {
                first = j;
                if is_item(lines[j]) {
                    return j;
                }
            }
            Some(p) if p.col < k.col => return first,
            _ => {}
        }
    }
    first
}

/// A value of another YAML type than `value` (a scalar, maybe with a comment after it).
fn other_type(r: &mut StdRng, value: &str) -> &'static str {
    let scalar = match value.find(" #") {
        Some(i) => value[..i].trim(),
        None => value,
    };
    let options: &[&'static str] = if scalar.parse::<i64>().is_ok() {
        &["[1, 2]", "{ a: 1 }", "not-a-number", "true"]
    } else if scalar == "true" || scalar == "false" {
        &["[true]", "{ a: 1 }", "12345", "maybe"]
    } else {
        &["[x, y]", "{ k: v }", "12345", "true"]
    };
    options.choose(r).unwrap()
}

fn misspell(r: &mut StdRng, key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    for _ in 0..10 {
        let i = r.random_range(0..chars.len());
        let mut c = chars.clone();
        match r.random_range(0..4) {
            0 if c.len() > 1 => {
                c.remove(i);
            }
            1 if c.len() > 1 && i + 1 < c.len() => c.swap(i, i + 1),
            2 => c.insert(i, c[i]),
            _ => c.push('z'),
        }
        let s: String = c.into_iter().collect();
        if s != key {
            return s;
        }
    }
    format!("{key}z")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
enum Kind {
    DeleteLine,
    DuplicateKey,
    TypeChange,
    MisspellKey,
    Indentation,
    Tab,
    StrayCharacter,
    Truncate,
}

const KINDS: [Kind; 8] = [
    Kind::DeleteLine,
    Kind::DuplicateKey,
    Kind::TypeChange,
    Kind::MisspellKey,
    Kind::Indentation,
    Kind::Tab,
    Kind::StrayCharacter,
    Kind::Truncate,
];

/// One mutation of one file.
struct Mutation {
    file: String,
    text: String,
    kind: Kind,
    /// 1-based: the first line that differs from the original.
    line: usize,
    /// 1-based: for a key mutation, the first line of the mapping that holds the key (the
    /// `- ` line of a sequence item).
    mapping_line: usize,
    /// The store name on the changed line, when that line names a store (`stores:` children):
    /// a change there may rename the store, and then the errors stand where it is used.
    store: Option<String>,
    /// For a mutation of a key: the key names involved (old and new), and whether the key is a
    /// name of the operator's choosing (a store name), so that changing it renames the thing.
    key: Option<(Vec<String>, bool)>,
    what: String,
}

fn join(lines: &[String], trailing_newline: bool) -> String {
    let mut s = lines.join("\n");
    if trailing_newline {
        s.push('\n');
    }
    s
}

/// A mutation of `kind` on `text`; `at` picks the line (a key line for key mutations), or
/// `None` draws one.
fn mutate(
    r: &mut StdRng,
    file: &str,
    text: &str,
    kind: Kind,
    at: Option<usize>,
) -> Option<Mutation> {
    let lines: Vec<&str> = text.lines().collect();
    let nl = text.ends_with('\n');
    let owned = || lines.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    let non_blank: Vec<usize> = (0..lines.len())
        .filter(|&i| !lines[i].trim().is_empty())
        .collect();
    let pick = |r: &mut StdRng, from: &[usize]| -> Option<usize> {
        match at {
            Some(i) => from.contains(&i).then_some(i),
            None => from.choose(r).copied(),
        }
    };
    let mk = |text: String, kind, i: usize, key, what: String| Mutation {
        file: file.to_owned(),
        text,
        kind,
        line: i + 1,
        mapping_line: mapping_start(&lines, i) + 1,
        store: lines
            .get(i)
            .and_then(|l| key_line(l))
            .filter(|_| parent_key(&lines, i).as_deref() == Some("stores"))
            .map(|k| k.key),
        key,
        what,
    };
    match kind {
        Kind::DeleteLine => {
            let i = pick(r, &non_blank)?;
            let mut l = owned();
            let gone = l.remove(i);
            Some(mk(
                join(&l, nl),
                kind,
                i,
                None,
                format!("deleted line {}: {gone:?}", i + 1),
            ))
        }
        Kind::DuplicateKey => {
            // A key with an inline value, not a sequence item: the copy repeats the key in the
            // same mapping.
            let cands: Vec<usize> = (0..lines.len())
                .filter(|&i| {
                    key_line(lines[i]).is_some_and(|k| {
                        !lines[i].trim_start().starts_with("- ") && !k.value.is_empty()
                    })
                })
                .collect();
            let i = pick(r, &cands)?;
            let k = key_line(lines[i])?;
            let mut l = owned();
            l.insert(i + 1, lines[i].to_owned());
            Some(mk(
                join(&l, nl),
                kind,
                i,
                Some((vec![k.key.clone()], false)),
                format!("duplicated line {}: {:?}", i + 1, lines[i]),
            ))
        }
        Kind::TypeChange => {
            let cands: Vec<usize> = (0..lines.len())
                .filter(|&i| {
                    key_line(lines[i]).is_some_and(|k| {
                        !k.value.is_empty()
                            && !k
                                .value
                                .starts_with(['{', '[', '|', '>', '&', '*', '!', '#'])
                    })
                })
                .collect();
            let i = pick(r, &cands)?;
            let k = key_line(lines[i])?;
            let new = other_type(r, &k.value);
            let mut l = owned();
            l[i] = format!("{} {new}", &lines[i][..k.colon_end]);
            Some(mk(
                join(&l, nl),
                kind,
                i,
                Some((vec![k.key.clone()], false)),
                format!("line {}: {:?} -> {:?}", i + 1, lines[i], l[i]),
            ))
        }
        Kind::MisspellKey => {
            let cands: Vec<usize> = (0..lines.len())
                .filter(|&i| key_line(lines[i]).is_some())
                .collect();
            let i = pick(r, &cands)?;
            let k = key_line(lines[i])?;
            let new = misspell(r, &k.key);
            let free = parent_key(&lines, i).as_deref() == Some("stores");
            let mut l = owned();
            l[i] = format!(
                "{}{new}{}",
                &lines[i][..k.col],
                &lines[i][k.col + k.key.len()..]
            );
            Some(mk(
                join(&l, nl),
                kind,
                i,
                Some((vec![k.key.clone(), new], free)),
                format!("line {}: {:?} -> {:?}", i + 1, lines[i], l[i]),
            ))
        }
        Kind::Indentation => {
            let i = pick(r, &non_blank)?;
            let indent = lines[i].len() - lines[i].trim_start_matches(' ').len();
            let delta: i64 = *[-2, -1, 1, 2, 3].choose(r).unwrap();
            let new = indent as i64 + delta;
            if new < 0 {
                return None;
            }
            let mut l = owned();
            l[i] = format!(
                "{}{}",
                " ".repeat(new as usize),
                lines[i].trim_start_matches(' ')
            );
            Some(mk(
                join(&l, nl),
                kind,
                i,
                None,
                format!("line {}: {:?} -> {:?}", i + 1, lines[i], l[i]),
            ))
        }
        Kind::Tab | Kind::StrayCharacter => {
            let i = pick(r, &non_blank)?;
            let line = lines[i];
            let indent = line.len() - line.trim_start_matches(' ').len();
            let positions: Vec<usize> = line
                .char_indices()
                .map(|(p, _)| p)
                .chain([line.len()])
                .collect();
            let mut l = owned();
            l[i] = if kind == Kind::Tab {
                if indent > 0 && r.random_bool(0.5) {
                    // A tab in place of an indentation space.
                    format!("{}\t{}", " ".repeat(indent - 1), &line[indent..])
                } else {
                    let p = *positions.choose(r).unwrap();
                    format!("{}\t{}", &line[..p], &line[p..])
                }
            } else {
                let stray = *[
                    '@', '`', '%', '{', '}', '[', ']', ':', '"', '\'', '|', '>', '*', '&', '!',
                    ',', '?', '\u{0}', '\u{7f}', '\u{feff}',
                ]
                .choose(r)
                .unwrap();
                let p = *positions.choose(r).unwrap();
                format!("{}{stray}{}", &line[..p], &line[p..])
            };
            Some(mk(
                join(&l, nl),
                kind,
                i,
                None,
                format!("line {}: {:?} -> {:?}", i + 1, line, l[i]),
            ))
        }
        Kind::Truncate => {
            let cut = match at {
                Some(_) => return None,
                None => r.random_range(0..text.len()),
            };
            let cut = (0..=cut).rev().find(|&c| text.is_char_boundary(c))?;
            let line = text[..cut].matches('\n').count();
            Some(mk(
                text[..cut].to_owned(),
                kind,
                line,
                None,
                format!("truncated to {cut} of {} bytes", text.len()),
            ))
        }
    }
}

/// An error as both the library and the reload endpoint report it.
#[derive(Debug)]
struct Located {
    file: String,
    line: usize,
    /// The YAML path's last key (without an index), when the error has a path.
    last_key: Option<String>,
    /// Path and message, as printed.
    text: String,
    syntax: bool,
}

fn located(e: &engine::config::ConfigError) -> Located {
    let last = e.path.rsplit('.').next().unwrap_or("");
    let last = last.split('[').next().unwrap_or("");
    Located {
        file: e
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        line: e.line,
        last_key: (!last.is_empty()).then(|| last.to_owned()),
        text: format!("{}: {}", e.path, e.message),
        syntax: e.message.starts_with("invalid YAML"),
    }
}

/// Parses `…/name.yaml:LINE:COL: rest` as `/reload` reports an error.
fn located_text(s: &str, files: &[&str]) -> Located {
    for f in files {
        let needle = format!("{f}:");
        if let Some(i) = s.find(&needle) {
            let rest = &s[i + needle.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let after = rest[digits.len()..]
                .trim_start_matches(':')
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start_matches(':')
                .trim_start();
            // `path: message`, where the path is a word without spaces.
            let last_key = after
                .split_once(": ")
                .map(|(p, _)| p)
                .filter(|p| !p.is_empty() && !p.contains(' '))
                .and_then(|p| p.rsplit('.').next())
                .and_then(|k| k.split('[').next())
                .filter(|k| !k.is_empty())
                .map(str::to_owned);
            return Located {
                file: (*f).to_owned(),
                line: digits.parse().unwrap_or(0),
                last_key,
                text: after.to_owned(),
                syntax: after.starts_with("invalid YAML"),
            };
        }
    }
    panic!("the error names no file of the folder: {s:?}");
}

/// What every refusal of a mutated set must satisfy. `texts` are the folder's files as they
/// stand (the mutated one mutated).
fn check_refusal(m: &Mutation, errors: &[Located], texts: &BTreeMap<String, String>, ctx: &str) {
    let listing = errors
        .iter()
        .map(|e| format!("  {}:{}: {}", e.file, e.line, e.text))
        .collect::<Vec<_>>()
        .join("\n");
    let ctx = format!(
        "{ctx}\n  {}: {} ({:?})\n  errors:\n{listing}",
        m.file, m.what, m.kind
    );
    assert!(!errors.is_empty(), "refused without an error: {ctx}");
    for e in errors {
        let text = texts.get(&e.file).unwrap_or_else(|| {
            panic!(
                "an error names {:?}, not a file of the folder: {ctx}",
                e.file
            )
        });
        let lines = text.lines().count().max(1);
        assert!(
            (1..=lines + 1).contains(&e.line),
            "line {} is not a line of {} ({lines} lines): {ctx}",
            e.line,
            e.file
        );
        assert!(!e.text.trim().is_empty(), "an empty message: {ctx}");
        if e.syntax {
            // Only the mutated file can be unreadable, and not before the first change.
            assert_eq!(e.file, m.file, "a syntax error in an untouched file: {ctx}");
            // A duplicate key (from any mutation: a deleted `- name:` line merges two nodes)
            // is reported at its second copy, which is at or after the change
            // (a_duplicate_key_is_located_at_the_duplicate), and so is an error serde_yaml
            // gives no location (syntax_errors_are_located_at_their_line).
            assert!(
                e.line >= m.line.max(1),
                "a syntax error reported at line {}, before the change at line {}: {ctx}",
                e.line,
                m.line
            );
        }
    }
    // A store renamed: its users say they cannot find it, by name.
    let renamed = |e: &Located| {
        m.store
            .as_ref()
            .is_some_and(|name| e.text.contains(&format!("no store named {name:?}")))
    };
    match &m.key {
        Some((_, true)) => assert!(
            errors.iter().any(renamed),
            "a renamed store is reported where it is used: {ctx}"
        ),
        Some((names, false)) => {
            assert!(
                errors.iter().any(|e| e.file == m.file),
                "no error names the changed file: {ctx}"
            );
            // The error is at the key's line and names the key. Two exceptions:
            // - a required key misspelt (`type` -> `tpye`) is missing from its node, which is
            //   where the error stands, naming the key that is missing;
            // - a duplicated key is reported at its second copy, the line after the change.
            let (old, at_node) = (&names[0], m.mapping_line);
            let names_key = |e: &Located| {
                names.iter().any(|k| {
                    e.last_key.as_deref() == Some(k.as_str())
                        || e.text.contains(&format!("`{k}`"))
                        || e.text.contains(&format!("\"{k}\""))
                })
            };
            let placed = |e: &Located| match m.kind {
                Kind::DuplicateKey => e.line == m.line + 1,
                Kind::MisspellKey => {
                    e.line == m.line || (e.line == at_node && e.text.contains(&format!("`{old}`")))
                }
                _ => e.line == m.line,
            };
            assert!(
                errors
                    .iter()
                    .any(|e| e.file == m.file && placed(e) && names_key(e)),
                "no error at line {} naming {names:?}: {ctx}",
                m.line
            );
        }
        // Removed lines can leave the file valid and a setting that another file needs
        // missing (`applications:`, a store): the errors then stand where it is needed.
        None if matches!(m.kind, Kind::DeleteLine | Kind::Truncate) => {}
        None => assert!(
            errors.iter().any(|e| e.file == m.file || renamed(e)),
            "no error names the changed file: {ctx}"
        ),
    }
}

/// A key given twice in one mapping is refused (serde_yaml's "duplicate entry") at the repeated
/// key, as every other error of the loader points at its key. serde_yaml itself places it where
/// the mapping starts (here lines 5 and 1), which in a long node can be many lines away.
#[tokio::test]
async fn a_duplicate_key_is_located_at_the_duplicate() {
    let mut misplaced = Vec::new();
    for (yaml, line, key) in [
        (
            "policies:\n  - name: p\n    route: { path: /p }\n    chain:\n      - name: r\n        type: set_response\n        body: one\n        body: two\n",
            8,
            "body",
        ),
        (
            "listen: 127.0.0.1:0\nlimits: { max_headers: 10 }\nlisten: 127.0.0.1:1\n",
            3,
            "listen",
        ),
    ] {
        let dir = PolicyDir::new(&[("p.yaml", yaml)]);
        let errors = engine::check(dir.path()).await.expect_err(yaml).0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert!(e.message.contains(&format!("\"{key}\"")), "{e}");
        if e.line != line {
            misplaced.push(format!("{e} (the repeated `{key}` is on line {line})"));
        }
    }
    assert!(misplaced.is_empty(), "{misplaced:#?}");
}

/// A syntax error is located where the parser stopped, so that the operator can find it.
/// serde_yaml gives some errors no location (a control character, which it reports by byte
/// offset; a document that ends where a less indented line follows its top-level key), and the
/// loader (`config::yaml::parse`) locates them itself. Both were once reported at 1:1.
#[tokio::test]
async fn syntax_errors_are_located_at_their_line() {
    let mut misplaced = Vec::new();
    for (yaml, lines) in [
        (
            "policies:\n  - name: p\n    route: { path: /p }\n    chain: [{ name: r, type: set_response, status: 2\u{0}0 }]\n",
            [4, 4],
        ),
        (
            "# a comment\n   policies:\n  - name: p\n    route: { path: /p }\n    chain: [{ name: r, type: set_response }]\n",
            [2, 3],
        ),
    ] {
        let dir = PolicyDir::new(&[("p.yaml", yaml)]);
        let errors = engine::check(dir.path()).await.expect_err(yaml).0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert!(e.message.starts_with("invalid YAML"), "{e}");
        if !(lines[0]..=lines[1]).contains(&e.line) {
            misplaced.push(format!("{e} (the mistake is on line {})", lines[0]));
        }
    }
    assert!(misplaced.is_empty(), "{misplaced:#?}");
}

/// The shipped policy files, by name.
fn shipped() -> BTreeMap<String, String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(&dir).expect("policies/") {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            files.insert(
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            );
        }
    }
    assert!(files.contains_key("token.yaml"), "{:?}", files.keys());
    files
}

/// Every key line of every file misspelt and (where it holds a scalar) given a value of another
/// type, then `n` random mutations of every kind.
fn plan(r: &mut StdRng, files: &BTreeMap<String, String>, n: usize) -> Vec<Mutation> {
    let mut out = Vec::new();
    for (name, text) in files {
        let lines: Vec<&str> = text.lines().collect();
        for i in 0..lines.len() {
            for kind in [Kind::MisspellKey, Kind::TypeChange] {
                out.extend(mutate(r, name, text, kind, Some(i)));
            }
        }
    }
    let names: Vec<&String> = files.keys().collect();
    let mut drawn = 0;
    while drawn < n {
        let name = *names.choose(r).unwrap();
        let kind = *KINDS.choose(r).unwrap();
        if let Some(m) = mutate(r, name, &files[name], kind, None) {
            out.push(m);
            drawn += 1;
        }
    }
    out
}

#[tokio::test]
async fn malformed_policy_files_are_refused_with_file_line_and_key() {
    let (seed, mut rng) = seeded("policy check", 0xc4ec);
    let n_random = random_cases(300);
    let started = Instant::now();
    let files = shipped();
    let names: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let dir = PolicyDir::new(&names);
    engine::check(dir.path())
        .await
        .expect("the shipped policies are valid");
    let mutations = plan(&mut rng, &files, n_random);
    let mut refused: BTreeMap<Kind, usize> = BTreeMap::new();
    let mut accepted: BTreeMap<Kind, usize> = BTreeMap::new();
    for (i, m) in mutations.iter().enumerate() {
        dir.write(&m.file, &m.text);
        let mut texts = files.clone();
        texts.insert(m.file.clone(), m.text.clone());
        match engine::check(dir.path()).await {
            Ok(_) => *accepted.entry(m.kind).or_default() += 1,
            Err(errors) => {
                *refused.entry(m.kind).or_default() += 1;
                let errors: Vec<Located> = errors.0.iter().map(located).collect();
                check_refusal(m, &errors, &texts, &format!("seed {seed}, mutation {i}"));
            }
        }
        dir.write(&m.file, &files[&m.file]);
    }
    // Misspelt keys and values of the wrong type are refused, every one (deny_unknown_fields
    // and typed configuration); the exceptions would be listed here.
    for kind in [Kind::MisspellKey, Kind::TypeChange, Kind::DuplicateKey] {
        assert_eq!(
            accepted.get(&kind),
            None,
            "seed {seed}: some {kind:?} mutations were accepted"
        );
    }
    assert!(refused.values().sum::<usize>() > 0);
    println!(
        "policy check: {} mutations, refused {refused:?}, still valid {accepted:?}, {:.1?}",
        mutations.len(),
        started.elapsed()
    );
}

/// What the running policy answers, for comparison before and after a refused reload.
async fn fingerprint(gw: &tests::Gateway, a: &Client, access: &str) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    let r = tests::get(gw.public_addr, "/ping").await;
    out.push((r.status.as_u16(), r.text()));
    let r = tests::send(
        gw.public_addr,
        tests::request(Method::GET, "/api/whoami")
            .header("authorization", format!("Bearer {access}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    // expires_in counts down: the client and the scope identify the answer.
    let who = if r.status == StatusCode::OK {
        let j = r.json();
        format!("{} {}", j["client_id"], j["scope"])
    } else {
        r.text()
    };
    out.push((r.status.as_u16(), who));
    let r = post_form(
        gw.public_addr,
        TOKEN,
        &[("authorization", &basic(&a.id, &a.secret))],
        &[("grant_type", "password")],
    )
    .await;
    out.push((r.status.as_u16(), r.text()));
    let r = post_form(gw.public_addr, "/nowhere", &[], &[]).await;
    out.push((r.status.as_u16(), String::new()));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_changes_nothing() {
    let (seed, mut rng) = seeded("policy reload", 0x4e10);
    let n_random = random_cases(200);
    let started = Instant::now();
    let mut files = shipped();
    files.retain(|n, _| n != "gateway.yaml");
    files.insert("gateway.yaml".into(), SETTINGS.into());
    let names: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let file_names: Vec<&str> = files.keys().map(String::as_str).collect();
    let dir = PolicyDir::new(&names);
    let (id, secret) = add_client(dir.path(), "read", "client_credentials,refresh_token").await;
    let a = Client { id, secret };
    let gw = dir.start().await;
    let (mut access, rt) = pair(&gw, &a, "read").await;
    let mut before = fingerprint(&gw, &a, &access).await;
    assert_eq!(before[0].0, 200, "{before:?}");
    assert_eq!(
        before[1],
        (200, format!("{:?} \"read\"", a.id)),
        "{before:?}"
    );
    let store = gw.state.runtime.load().stores["tokens"].store.clone();

    // Only random mutations here: a reload costs more than a check, and the check test walks
    // every key.
    let mut mutations = Vec::new();
    while mutations.len() < n_random {
        let name = *file_names.choose(&mut rng).unwrap();
        let kind = *KINDS.choose(&mut rng).unwrap();
        mutations.extend(mutate(&mut rng, name, &files[name], kind, None));
    }
    let (mut refused, mut accepted) = (0, 0);
    let mut store_kept = true;
    for (i, m) in mutations.iter().enumerate() {
        let ctx = format!("seed {seed}, mutation {i}: {}: {}", m.file, m.what);
        let running = gw.state.runtime.load_full();
        dir.write(&m.file, &m.text);
        let r = post_reload(&gw).await;
        match r.status {
            StatusCode::UNPROCESSABLE_ENTITY => {
                refused += 1;
                let j = r.json();
                assert_eq!(j["reloaded"], false, "{ctx}");
                let errors: Vec<Located> = j["errors"]
                    .as_array()
                    .unwrap_or_else(|| panic!("no errors array: {ctx}"))
                    .iter()
                    .map(|e| located_text(e.as_str().expect("error string"), &file_names))
                    .collect();
                let mut texts = files.clone();
                texts.insert(m.file.clone(), m.text.clone());
                check_refusal(m, &errors, &texts, &ctx);
                assert!(
                    Arc::ptr_eq(&running, &gw.state.runtime.load_full()),
                    "a refused reload swapped the runtime: {ctx}"
                );
                let after = fingerprint(&gw, &a, &access).await;
                assert_eq!(after, before, "the running policy changed: {ctx}");
                dir.write(&m.file, &files[&m.file]);
            }
            StatusCode::OK => {
                // Still valid: swapped in. Put the original back and make sure it serves.
                accepted += 1;
                dir.write(&m.file, &files[&m.file]);
                let r = post_reload(&gw).await;
                assert_eq!(r.status, StatusCode::OK, "{ctx}: {}", r.text());
                let now = gw.state.runtime.load().stores["tokens"].store.clone();
                if !Arc::ptr_eq(&now, &store) {
                    store_kept = false;
                    access = pair(&gw, &a, "read").await.0;
                }
                before = fingerprint(&gw, &a, &access).await;
                assert_eq!(before[0].0, 200, "{ctx}: {before:?}");
                assert_eq!(before[1].0, 200, "{ctx}: {before:?}");
            }
            other => panic!("/reload answered {other}: {ctx}: {}", r.text()),
        }
    }
    assert!(refused > 0, "seed {seed}: no mutation was refused");
    // The token issued before the reloads still refreshes once (unless a valid mutation
    // changed the store's settings and with them the store).
    if store_kept {
        let r = refresh(&gw, &a, &rt).await;
        assert_eq!(r.status, StatusCode::OK, "seed {seed}: {}", r.text());
    }
    println!(
        "policy reload: {} mutations, {refused} refused, {accepted} still valid (swapped in and back), store kept: {store_kept}, {:.1?}",
        mutations.len(),
        started.elapsed()
    );
    gw.shutdown().await;
}
