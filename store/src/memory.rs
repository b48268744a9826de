//! The in-memory store: moka, the embedded default. Fast, private to one process, lost on
//! restart.
//!
//! One cache holds every token, keyed by its [`Digest`]; an access token and the refresh token
//! of the same issue share one `Arc<Grant>`, so an entry is a digest, a pointer and a few
//! integers. Each entry expires at the token's own `expires_at` (moka's per-entry [`Expiry`]),
//! and the cache is bounded by `max_tokens` with plain LRU eviction, so a new token is always
//! admitted (TinyLFU could refuse a fresh token, which would hand the client a dead one);
//! evictions are counted.
//!
//! Every change to an existing entry (consume, revoke) happens under the lock of the token's
//! family, taken from a small set of striped mutexes. That makes rotation atomic (of N
//! concurrent rotations of one token exactly one sees it unconsumed) and lets a family
//! revocation scan the cache without racing a rotation that would add a fresh pair behind it.
//! Consumed refresh tokens stay as tombstones until their expiry, so a replay is told apart
//! from an unknown token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use crate::*;

const LOCK_STRIPES: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Access,
    Refresh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Live,
    Consumed,
    Revoked,
}

/// What a consumed refresh token remembers about its rotation. Boxed behind the entry so that
/// live entries, the vast majority, do not pay for it.
#[derive(Debug)]
struct Tomb {
    /// The token written by the rotation that consumed this one (the new refresh token, or
    /// the new access token when no refresh token was issued). While it is live, this token
    /// is the immediate predecessor of the live one and may replay.
    successor: Digest,
    replay: Option<Replay>,
}

/// One cache entry. Kept small on purpose (see the size test below): the family id is stored
/// as two u64 so that the u128's 16-byte alignment does not pad the struct.
#[derive(Clone, Debug)]
struct Entry {
    grant: Arc<Grant>,
    tomb: Option<Arc<Tomb>>,
    family: [u64; 2],
    issued_at: UnixTime,
    expires_at: UnixTime,
    generation: u32,
    kind: Kind,
    state: State,
}

impl Entry {
    fn new(
        grant: Arc<Grant>,
        family: FamilyId,
        generation: u32,
        issued_at: UnixTime,
        token: NewToken,
        kind: Kind,
    ) -> Self {
        Entry {
            grant,
            tomb: None,
            family: [(family.0 >> 64) as u64, family.0 as u64],
            issued_at,
            expires_at: token.expires_at,
            generation,
            kind,
            state: State::Live,
        }
    }

    fn family(&self) -> FamilyId {
        FamilyId((u128::from(self.family[0]) << 64) | u128::from(self.family[1]))
    }

    fn is_live(&self, now: UnixTime) -> bool {
        self.state == State::Live && self.expires_at > now
    }
}

/// moka's expiry follows the token's own lifetime. moka measures with a monotonic clock and
/// tokens with the wall clock, so the remaining lifetime is taken from the wall clock when the
/// entry is written; lookups still compare `expires_at` with the caller's `now`, so a token is
/// refused at its expiry whatever moka has or has not removed yet.
struct TokenExpiry;

impl TokenExpiry {
    fn remaining(entry: &Entry) -> Option<Duration> {
        let left = entry.expires_at.saturating_sub(crate::now());
        Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
    }
}

impl Expiry<Digest, Entry> for TokenExpiry {
    fn expire_after_create(&self, _key: &Digest, value: &Entry, _at: Instant) -> Option<Duration> {
        Self::remaining(value)
    }

    fn expire_after_update(
        &self,
        _key: &Digest,
        value: &Entry,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Self::remaining(value)
    }
}

/// The moka token store. Cheap to share behind an `Arc`.
pub struct MemoryStore {
    cache: Cache<Digest, Entry, DigestBuildHasher>,
    locks: Box<[Mutex<()>]>,
    evictions: Arc<AtomicU64>,
    /// Entries moka removed by itself at their expiry since the last purge; the purge reports
    /// them together with the ones it removes.
    expired: Arc<AtomicU64>,
}

impl MemoryStore {
    /// A store holding at most `max_tokens` entries (access and refresh tokens together,
    /// tombstones included). Past that the least recently used entries are evicted.
    pub fn new(max_tokens: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let expired = Arc::new(AtomicU64::new(0));
        let (ev, ex) = (evictions.clone(), expired.clone());
        let cache = Cache::builder()
            .max_capacity(max_tokens)
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(TokenExpiry)
            .eviction_listener(move |_key, _value, cause| match cause {
                RemovalCause::Size => {
                    ev.fetch_add(1, Ordering::Relaxed);
                }
                RemovalCause::Expired => {
                    ex.fetch_add(1, Ordering::Relaxed);
                }
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            })
            .build_with_hasher(DigestBuildHasher::default());
        MemoryStore {
            cache,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            evictions,
            expired,
        }
    }

    /// How many entries were evicted because the store was full (not counting expiry).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Entries currently held (live, consumed and revoked), after moka's pending maintenance.
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    fn lock(&self, family: FamilyId) -> MutexGuard<'_, ()> {
        let stripe = (family.0 as usize) % self.locks.len();
        // The guarded data is `()`: a panic elsewhere cannot have left it inconsistent.
        self.locks[stripe].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_issue(&self, issue: &Issue, family: FamilyId, generation: u32) {
        self.cache.insert(
            issue.access.digest,
            Entry::new(
                issue.access_grant.as_ref().unwrap_or(&issue.grant).clone(),
                family,
                generation,
                issue.issued_at,
                issue.access,
                Kind::Access,
            ),
        );
        if let Some(refresh) = issue.refresh {
            self.cache.insert(
                refresh.digest,
                Entry::new(
                    issue.grant.clone(),
                    family,
                    generation,
                    issue.issued_at,
                    refresh,
                    Kind::Refresh,
                ),
            );
        }
    }

    fn rotate_locked(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &(dyn for<'a> Fn(&'a RefreshToken) -> RotateDecision + Send + Sync),
    ) -> RotateOutcome {
        let Some(entry) = self.cache.get(presented) else {
            return RotateOutcome::Invalid;
        };
        if entry.kind != Kind::Refresh || entry.state == State::Revoked || entry.expires_at <= now {
            return RotateOutcome::Invalid;
        }
        if entry.grant.client_id != client_id {
            return RotateOutcome::WrongClient;
        }
        let family = entry.family();
        if entry.state == State::Consumed {
            let replay = entry.tomb.as_ref().and_then(|tomb| {
                let replay = tomb.replay.as_ref().filter(|r| r.until > now)?;
                let successor_live = self
                    .cache
                    .get(&tomb.successor)
                    .is_some_and(|s| s.is_live(now));
                successor_live.then(|| replay.clone())
            });
            return RotateOutcome::AlreadyRotated { family, replay };
        }
        let consumed = RefreshToken {
            grant: entry.grant.clone(),
            family,
            generation: entry.generation,
            issued_at: entry.issued_at,
            expires_at: entry.expires_at,
        };
        let issue = match decide(&consumed) {
            RotateDecision::Reject => return RotateOutcome::Rejected,
            RotateDecision::Rotate(issue) => issue,
        };
        let generation = entry.generation.saturating_add(1);
        self.write_issue(&issue, family, generation);
        let successor = issue.refresh.map_or(issue.access.digest, |r| r.digest);
        let tomb = Entry {
            state: State::Consumed,
            tomb: Some(Arc::new(Tomb {
                successor,
                replay: issue.replay,
            })),
            ..entry
        };
        self.cache.insert(*presented, tomb);
        RotateOutcome::Rotated { consumed }
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn issue(&self, issue: Issue) -> StoreResult<()> {
        self.write_issue(&issue, issue.family, issue.generation);
        Ok(())
    }

    async fn access_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> StoreResult<Option<AccessToken>> {
        Ok(self
            .cache
            .get(digest)
            .filter(|e| e.kind == Kind::Access && e.is_live(now))
            .map(|e| AccessToken {
                family: e.family(),
                grant: e.grant,
                issued_at: e.issued_at,
                expires_at: e.expires_at,
            }))
    }

    async fn rotate(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &(dyn for<'a> Fn(&'a RefreshToken) -> RotateDecision + Send + Sync),
    ) -> StoreResult<RotateOutcome> {
        // The family of a digest never changes, so it can be read before taking the lock; the
        // entry itself is read again under it.
        let Some(family) = self.cache.get(presented).map(|e| e.family()) else {
            return Ok(RotateOutcome::Invalid);
        };
        let _guard = self.lock(family);
        Ok(self.rotate_locked(presented, client_id, now, decide))
    }

    async fn revoke_token(&self, digest: &Digest) -> StoreResult<bool> {
        let now = crate::now();
        let Some(family) = self.cache.get(digest).map(|e| e.family()) else {
            return Ok(false);
        };
        let _guard = self.lock(family);
        match self.cache.get(digest) {
            Some(entry) if entry.is_live(now) => {
                self.cache.insert(
                    *digest,
                    Entry {
                        state: State::Revoked,
                        ..entry
                    },
                );
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn revoke_family(&self, family: FamilyId) -> StoreResult<u64> {
        // A full scan: family revocation is rare (reuse detection, logout), and an index would
        // cost memory on every entry. Revoked tombstones answer `Invalid` afterwards, so a
        // client replaying a token cannot trigger the scan twice for one family. Holding the
        // family lock keeps a concurrent rotation from adding a pair the scan would miss.
        let now = crate::now();
        let _guard = self.lock(family);
        let mut revoked = 0;
        for (digest, entry) in self.cache.iter() {
            if entry.family() != family || entry.state == State::Revoked {
                continue;
            }
            if entry.is_live(now) {
                revoked += 1;
            }
            self.cache.insert(
                *digest,
                Entry {
                    state: State::Revoked,
                    tomb: None,
                    ..entry
                },
            );
        }
        Ok(revoked)
    }

    async fn purge_expired(&self, now: UnixTime) -> StoreResult<u64> {
        self.cache.run_pending_tasks();
        let mut removed = self.expired.swap(0, Ordering::Relaxed);
        let expired: Vec<Digest> = self
            .cache
            .iter()
            .filter(|(_, e)| e.expires_at <= now)
            .map(|(d, _)| *d)
            .collect();
        for digest in expired {
            if self.cache.remove(&digest).is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn count_live(&self, now: UnixTime) -> StoreResult<u64> {
        Ok(self.cache.iter().filter(|(_, e)| e.is_live(now)).count() as u64)
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_small() {
        // Budget at 1M entries is 350 bytes per refresh entry including moka's own
        // bookkeeping; the value itself must stay a small fixed size.
        assert!(
            std::mem::size_of::<Entry>() <= 56,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn family_round_trips_through_entry() {
        let family = FamilyId(u128::MAX - 12345);
        let e = Entry::new(
            Arc::default(),
            family,
            0,
            0,
            NewToken {
                digest: Digest([0; 32]),
                expires_at: 1,
            },
            Kind::Access,
        );
        assert_eq!(e.family(), family);
    }
}
