//! Token stores and the client application registry.
//!
//! Every filter talks to tokens through [`TokenStore`], so a policy can keep its tokens in memory
//! (the embedded default), in SQLite (durable, one machine) or in PostgreSQL (shared by
//! many gateway replicas) without any change to the filter. Stores never see a token: they keep
//! the SHA-256 [`Digest`] of it, so a dump of the cache or the database holds nothing usable.
//!
//! Rotation is the one delicate operation: [`TokenStore::rotate`] consumes a refresh token and
//! writes its successor as one atomic step, so that of N concurrent refreshes of one token
//! exactly one wins. A consumed token is kept as a tombstone until it expires, which is what
//! lets a store tell an unknown token from a replayed one (RFC 9700 §4.14.2 reuse detection).

#![forbid(unsafe_code)]

pub mod clients;
pub mod config;
pub mod memory;
pub mod purge;
pub mod sql;
pub mod testing;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use clients::{ClientApplication, ClientRegistry, ImmediateRegistry, RegistryError};
pub use config::{StoreConfig, open_store};

/// SHA-256 of a token (or secret). The only form in which a store ever holds a token.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

// A digest is already uniformly distributed: eight of its bytes are as good a hash as any
// hasher would make of all 32. Feeding them as one u64 lets [`DigestHasher`] pass them through
// (other hashers still mix them as usual).
impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// A pass-through hasher for tables keyed by [`Digest`]. Safe against collision flooding
/// because keys written to a table are digests of server-generated tokens; what a client
/// presents is only looked up.
#[derive(Default, Clone, Copy)]
pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys other than Digest: fold the bytes in (FNV-1a).
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// `BuildHasher` for tables keyed by [`Digest`].
pub type DigestBuildHasher = std::hash::BuildHasherDefault<DigestHasher>;

impl Digest {
    /// Digest of a token as the client presents it.
    pub fn of(token: &str) -> Self {
        Digest(Sha256::digest(token.as_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Digest)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Digest {
    // Eight hex characters are enough to correlate log lines and far too few to be useful to
    // anyone holding a dump: the full digest stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({}…)", &hex::encode(&self.0[..4]))
    }
}

/// Seconds since the Unix epoch. Stores compare expiry with this clock, never with a monotonic
/// one, so that a token's expiry survives restarts and means the same on every replica.
pub type UnixTime = i64;

pub fn now() -> UnixTime {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Identifies one grant and every token descended from it by rotation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FamilyId(pub u128);

impl FamilyId {
    pub fn random() -> Self {
        FamilyId(rand::random())
    }
    pub fn to_hex(&self) -> String {
        format!("{:032x}", self.0)
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        u128::from_str_radix(s, 16).ok().map(FamilyId)
    }
}

impl fmt::Debug for FamilyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FamilyId({:032x})", self.0)
    }
}

/// What a token grants: who, to which client, which scope, and the operator's metadata.
/// Shared by the access and refresh tokens of one issue.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Grant {
    pub client_id: String,
    /// The resource owner, when there is one (`None` for client credentials).
    pub subject: Option<String>,
    /// Space-separated scope tokens, normalised (sorted, deduplicated) by the issuer.
    pub scope: String,
    /// Name/value pairs stored with the token (the seeds' "additional meta data").
    pub metadata: BTreeMap<String, String>,
}

/// A token about to be written: only its digest and its lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewToken {
    pub digest: Digest,
    pub expires_at: UnixTime,
}

/// One issue: an access token, optionally a refresh token, both under the same grant.
#[derive(Clone, Debug)]
pub struct Issue {
    pub grant: Arc<Grant>,
    pub family: FamilyId,
    /// 0 for the first issue of a family, +1 at every rotation.
    pub generation: u32,
    pub issued_at: UnixTime,
    pub access: NewToken,
    pub refresh: Option<NewToken>,
    /// The access token's own grant, when it differs from `grant`: a refresh that narrowed
    /// the scope gives the access token the narrower scope, while the new refresh token keeps
    /// the scope of the one presented (RFC 6749 §6). `None`: both use `grant`.
    pub access_grant: Option<Arc<Grant>>,
    /// For idempotent replay (`reuse_grace_secs`): the response that carried this issue,
    /// sealed with a key derived from the *presented* refresh token (see
    /// [`Replay`]); the store only keeps the ciphertext.
    pub replay: Option<Replay>,
}

/// An encrypted copy of the response that answered a rotation, kept until `until` so that a
/// client retrying with the same (now consumed) refresh token gets the same pair back. The key
/// is derived from the presented refresh token, which the store never sees, so the store holds
/// nothing it could decrypt by itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Replay {
    pub sealed: Vec<u8>,
    pub until: UnixTime,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Replay({} bytes, until {})",
            self.sealed.len(),
            self.until
        )
    }
}

/// A live access token as looked up (introspection, bearer checks, metadata read-back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessToken {
    pub grant: Arc<Grant>,
    pub family: FamilyId,
    pub issued_at: UnixTime,
    pub expires_at: UnixTime,
}

/// The refresh token being consumed, as [`TokenStore::rotate`] hands it to the caller's
/// decision: the caller checks scope and builds the successor from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshToken {
    pub grant: Arc<Grant>,
    pub family: FamilyId,
    pub generation: u32,
    pub issued_at: UnixTime,
    pub expires_at: UnixTime,
}

/// What the caller of [`TokenStore::rotate`] decides once it has seen the token.
pub enum RotateDecision {
    /// Consume the token and write this successor (its family and generation are set by the
    /// store from the consumed token: `generation + 1`).
    Rotate(Issue),
    /// Leave the token untouched (e.g. the requested scope is wider than the grant).
    Reject,
}

/// The decision a rotation takes on the token it found (see [`TokenStore::rotate`]).
///
/// (`for<'a>` is spelt out: `async_trait` would otherwise give the elided `&RefreshToken` the
/// lifetime of the whole call, and no store could lend `decide` a token it read.)
pub type Decide<'d> = dyn for<'a> Fn(&'a RefreshToken) -> RotateDecision + Send + Sync + 'd;

/// How a rotation ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The token was consumed and the successor written, atomically.
    Rotated { consumed: RefreshToken },
    /// The decision rejected the token; nothing changed.
    Rejected,
    /// No such token, or it expired, or it was revoked.
    Invalid,
    /// The token belongs to another client; nothing changed (RFC 6749 §6: bound to its client).
    WrongClient,
    /// The token was already consumed by an earlier rotation. When `replay` is set, the token
    /// is the immediate predecessor of the live one and still inside its grace window: the
    /// caller may return the sealed response instead of treating this as reuse.
    AlreadyRotated {
        family: FamilyId,
        replay: Option<Replay>,
    },
}

/// Store failures. Every one of them is an outage from the client's point of view (503):
/// a store never reports bad input through this type.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token store unavailable: {0}")]
    Unavailable(String),
    #[error("token store error: {0}")]
    Backend(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The contract every token store implements. `now` is passed in so that expiry is decided by
/// the caller's clock in one place and tests can move time.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// A short name for logs and metrics labels (`memory`, `sqlite`, `postgres`).
    fn kind(&self) -> &'static str;

    /// Writes a new family (generation 0): an access token and possibly a refresh token.
    async fn issue(&self, issue: Issue) -> StoreResult<()>;

    /// Looks up an access token. Expired or revoked tokens are `None` even before a purge.
    async fn access_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> StoreResult<Option<AccessToken>>;

    /// Consumes `presented` and writes the successor chosen by `decide`, as one atomic step:
    /// of N concurrent calls for one token, exactly one gets `Rotated`. The token must belong
    /// to `client_id`. `decide` must be quick and must not touch the store: the memory and
    /// SQLite stores run it while they hold the token (under its shard's lock, inside the
    /// transaction). PostgreSQL runs it on the token as read, before the statement that
    /// consumes it, so several concurrent calls may each decide while only one is written:
    /// what `decide` builds is the caller's to use only on `Rotated`.
    async fn rotate(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &Decide<'_>,
    ) -> StoreResult<RotateOutcome>;

    /// Revokes one token (access or refresh). Returns whether a live token was found.
    async fn revoke_token(&self, digest: &Digest) -> StoreResult<bool>;

    /// Revokes every token of a family (reuse detection): from its return on, no token of the
    /// family is found by a lookup, rotates or counts as live, and no rotation adds one.
    /// Returns how many live tokens went, where the store counts them as it revokes (SQL: the
    /// rows it updated), or `None` where it revokes at once but removes the tokens later (the
    /// memory store: see [`memory`]).
    async fn revoke_family(&self, family: FamilyId) -> StoreResult<Option<u64>>;

    /// Removes expired entries (including tombstones of consumed tokens past their expiry),
    /// and the entries of families revoked before the pass started where the store removes
    /// them later ([`TokenStore::revoke_family`]). Returns how many entries were removed.
    async fn purge_expired(&self, now: UnixTime) -> StoreResult<u64>;

    /// Live (unexpired, unconsumed, unrevoked) tokens, access and refresh together.
    async fn count_live(&self, now: UnixTime) -> StoreResult<u64>;

    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> StoreResult<()>;

    /// The same store without futures, when it never waits (the memory store): a filter then
    /// answers without boxing a future per operation, and a request whose nodes all answer this
    /// way runs without a request future at all. `None` (the default): every operation waits
    /// on a database. A store that wraps another (to count, to fail on purpose) keeps `None`
    /// unless it wraps the immediate side too: passing the inner one's through would bypass it.
    fn immediate(&self) -> Option<&dyn ImmediateStore> {
        None
    }
}

/// The operations of a [`TokenStore`] that never waits, called without a future. Each has the
/// contract of the [`TokenStore`] method of the same name (less `_now`).
pub trait ImmediateStore: Send + Sync {
    fn issue_now(&self, issue: Issue) -> StoreResult<()>;

    fn access_token_now(&self, digest: &Digest, now: UnixTime) -> StoreResult<Option<AccessToken>>;

    fn rotate_now(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &Decide<'_>,
    ) -> StoreResult<RotateOutcome>;

    fn revoke_family_now(&self, family: FamilyId) -> StoreResult<Option<u64>>;
}

pub type SharedStore = Arc<dyn TokenStore>;
