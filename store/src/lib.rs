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

/// SHA-256 of a token (or secret). The only form in which a store ever holds a token. For a
/// token with a [`Place`], 38 of its bits are the place's ([`Place::digest`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

// A digest is already uniformly distributed: eight of its bytes are as good a hash as any
// hasher would make of all 32. Feeding them as one u64 lets [`DigestHasher`] pass them through
// (other hashers still mix them as usual).
impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.first_u64());
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

    /// The first eight bytes, little-endian: what tables keyed by digests take as the hash.
    /// For a digest with a [`Place`], its low 24 bits are the place's position.
    pub fn first_u64(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
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

/// The characters of a token: what [`Place`] writes, and what the filters mint the rest with.
pub const TOKEN_ALPHABET: &[u8; 62] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Where a store will keep the entry of a token about to be minted, written into the token
/// itself so that presenting the token leads the store straight to its entry.
///
/// Only the memory store gives places ([`TokenStore::token_place`]). A hash table that places
/// each new entry at a random slot of a table of a million takes a cache miss per write, and
/// another per lookup; entries written in the order they are issued, each at the place its token
/// names, are written to memory in sequence and found where they were written
/// (bench/PROFILING.md, 2026-12-05). The place is a hint, not a key: an entry is still found by
/// its whole digest, so a token whose place was altered is simply not found, as any other
/// unknown token.
///
/// In the token: the first [`Place::CHARS`] characters, base 62, most significant first.
/// In the digest ([`Place::digest`]): the token's SHA-256 with the sequence in its bytes 0..3 and
/// the slot in the top 14 bits of bytes 8..10, the bytes from which the memory store takes a
/// digest's hash and its shard. 218 bits of the SHA-256 remain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    /// One of 2^14 slots, which the memory store maps to its shards.
    pub slot: u16,
    /// The position in the shard's table, in writing order (24 bits).
    pub seq: u32,
}

impl Place {
    /// Characters a place takes at the start of a token: 62^7 > 2^38.
    pub const CHARS: usize = 7;
    pub const SLOT_BITS: u32 = 14;
    pub const SEQ_BITS: u32 = 24;

    pub fn new(slot: u16, seq: u32) -> Self {
        Place {
            slot: slot & ((1 << Self::SLOT_BITS) - 1),
            seq: seq & ((1 << Self::SEQ_BITS) - 1),
        }
    }

    fn value(self) -> u64 {
        (u64::from(self.slot) << Self::SEQ_BITS) | u64::from(self.seq)
    }

    /// Appends the place's [`Place::CHARS`] characters.
    pub fn write(self, out: &mut Vec<u8>) {
        let mut chars = [0u8; Self::CHARS];
        let mut v = self.value();
        for c in chars.iter_mut().rev() {
            *c = TOKEN_ALPHABET[(v % 62) as usize];
            v /= 62;
        }
        out.extend_from_slice(&chars);
    }

    /// The place a token's first characters name, if they name one: any token does whose first
    /// [`Place::CHARS`] characters are alphanumeric and read below 2^38.
    pub fn parse(token: &str) -> Option<Place> {
        let mut v: u64 = 0;
        for &c in token.as_bytes().get(..Self::CHARS)? {
            let d = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                _ => return None,
            };
            v = v * 62 + u64::from(d);
        }
        (v < 1 << (Self::SLOT_BITS + Self::SEQ_BITS)).then(|| {
            Place::new(
                (v >> Self::SEQ_BITS) as u16,
                (v & ((1 << Self::SEQ_BITS) - 1)) as u32,
            )
        })
    }

    /// The digest of a token that carries this place (see the type's doc).
    pub fn digest(self, token: &str) -> Digest {
        let mut d = Digest::of(token);
        self.mark(&mut d);
        d
    }

    /// Writes the place into a digest's bytes 0..3 and the top 14 bits of bytes 8..10.
    pub fn mark(self, digest: &mut Digest) {
        let d = &mut digest.0;
        d[..3].copy_from_slice(&self.seq.to_le_bytes()[..3]);
        let slot = (self.slot << 2) | u16::from(d[9] & 3);
        d[8..10].copy_from_slice(&slot.to_be_bytes());
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
    /// to `client_id`. `decide` must be quick and must not touch the store but to mint its
    /// tokens ([`TokenStore::token_place`], [`TokenStore::token_digest`], which take no lock):
    /// the memory and SQLite stores run it while they hold the token (under its family's lock,
    /// inside the transaction). PostgreSQL runs it on the token as read, before the statement that
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

    /// The place the next token minted for this store should carry ([`Place`]), or `None`
    /// (the default: the SQL stores, which find a token by an index of their own). Asked once
    /// per token, on the thread that then writes it.
    fn token_place(&self) -> Option<Place> {
        None
    }

    /// The digest under which this store keeps `token`, and by which it is presented: every
    /// caller takes a token's digest here, never with [`Digest::of`] directly, since a store
    /// that gives places takes the place's bytes from the token ([`Place::digest`]). A store
    /// that wraps another passes this and [`TokenStore::token_place`] through, or neither.
    fn token_digest(&self, token: &str) -> Digest {
        Digest::of(token)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_place_reads_back_from_the_token_it_starts() {
        let edges = [
            (0, 0),
            ((1 << 14) - 1, (1 << 24) - 1),
            (1, 1 << 23),
            (8191, 12345),
        ];
        let random = (0..2000).map(|_| (rand::random::<u16>(), rand::random::<u32>()));
        for (slot, seq) in edges.into_iter().chain(random) {
            let place = Place::new(slot, seq);
            assert_eq!(u32::from(place.slot), u32::from(slot) & ((1 << 14) - 1));
            assert_eq!(place.seq, seq & ((1 << 24) - 1));
            let mut token = Vec::new();
            place.write(&mut token);
            assert_eq!(token.len(), Place::CHARS);
            assert!(token.iter().all(|c| TOKEN_ALPHABET.contains(c)));
            token.extend_from_slice(b"rest0fTheT0ken");
            let token = String::from_utf8(token).unwrap();
            assert_eq!(Place::parse(&token), Some(place), "{token}");
        }
    }

    #[test]
    fn text_that_names_no_place_has_none() {
        // Too short, not alphanumeric, or past 2^38 (62^7 is about 3.5e12): 'F' as first
        // character is already 5 * 62^6 > 2^38.
        for token in [
            "",
            "ABCDEF",
            "ABC-EFGhij",
            "ABCDEF\u{e9}",
            "FAAAAAAxyz",
            "zzzzzzz",
        ] {
            assert_eq!(Place::parse(token), None, "{token:?}");
        }
        assert!(Place::parse("AAAAAAA").is_some());
        assert!(Place::parse("EAAAAAAtail").is_some());
    }

    #[test]
    fn a_placed_digest_is_the_tokens_own_but_for_the_places_bytes() {
        let place = Place::new(0x2abc, 0x00c0_ffee);
        let token = "E3xAmpLeTokenWithSomeRandomCharactersAfterIt";
        let (plain, placed) = (Digest::of(token), place.digest(token));
        assert_eq!(
            placed.0[..3],
            [0xee, 0xff, 0xc0],
            "the sequence, little-endian"
        );
        assert_eq!(
            u16::from_be_bytes([placed.0[8], placed.0[9]]) >> 2,
            0x2abc,
            "the slot, in the top 14 bits of bytes 8..10"
        );
        let kept: Vec<usize> = (0..32).filter(|&i| plain.0[i] == placed.0[i]).collect();
        let theirs = (3..8).chain(10..32).all(|i| kept.contains(&i));
        assert!(theirs && placed.0[9] & 3 == plain.0[9] & 3, "{kept:?}");
        assert_eq!(place.digest(token), placed, "deterministic");
        assert_ne!(
            place.digest("E3xAmpLeTokenWithSomeRandomCharactersAfterIu"),
            placed
        );
    }
}
