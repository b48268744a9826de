//! The contract every [`TokenStore`] must pass, as plain async functions taking a fresh, empty
//! store. `store/tests/contract.rs` runs each of them on memory, SQLite and PostgreSQL; a new
//! store kind adds one line there. The functions panic (assert) on a violation.
//!
//! Time is moved through the `now` argument of the trait, never by sleeping: every function
//! starts from the wall clock (so that a store's own clock, a database's `now()` say, stays out
//! of the way) and looks at the store from later instants.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::distr::{Alphanumeric, SampleString};

use crate::*;

pub const CLIENT: &str = "client-a";
pub const OTHER_CLIENT: &str = "client-b";
pub const ACCESS_TTL: i64 = 600;
pub const REFRESH_TTL: i64 = 1200;

/// A store that answers as the one it wraps, through futures only: it never reports
/// [`TokenStore::immediate`], as a database would not. For tests of the waiting path over a
/// memory store.
pub struct ThroughFutures(pub SharedStore);

#[async_trait::async_trait]
impl TokenStore for ThroughFutures {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    async fn issue(&self, issue: Issue) -> StoreResult<()> {
        self.0.issue(issue).await
    }
    async fn access_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> StoreResult<Option<AccessToken>> {
        self.0.access_token(digest, now).await
    }
    async fn rotate(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &Decide<'_>,
    ) -> StoreResult<RotateOutcome> {
        self.0.rotate(presented, client_id, now, decide).await
    }
    async fn revoke_token(&self, digest: &Digest) -> StoreResult<bool> {
        self.0.revoke_token(digest).await
    }
    async fn revoke_family(&self, family: FamilyId) -> StoreResult<Option<u64>> {
        self.0.revoke_family(family).await
    }
    async fn purge_expired(&self, now: UnixTime) -> StoreResult<u64> {
        self.0.purge_expired(now).await
    }
    async fn count_live(&self, now: UnixTime) -> StoreResult<u64> {
        self.0.count_live(now).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.0.ping().await
    }
    fn token_place(&self) -> Option<Place> {
        self.0.token_place()
    }
    fn token_digest(&self, token: &str) -> Digest {
        self.0.token_digest(token)
    }
}

/// A fresh token of 46 alphanumeric characters, unknown to every store.
pub fn token() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 46)
}

/// A new token for `store`, as the gateway mints them (46 alphanumeric characters, starting
/// with the place the store gives, if any), and the digest the store keeps it under.
pub fn mint(store: &dyn TokenStore) -> (String, Digest) {
    let mut token = Vec::new();
    if let Some(place) = store.token_place() {
        place.write(&mut token);
    }
    let rest = 46 - token.len();
    token.extend_from_slice(
        Alphanumeric
            .sample_string(&mut rand::rng(), rest)
            .as_bytes(),
    );
    let token = String::from_utf8(token).expect("alphanumeric");
    let digest = store.token_digest(&token);
    (token, digest)
}

pub fn grant(client_id: &str) -> Arc<Grant> {
    Arc::new(Grant {
        client_id: client_id.to_owned(),
        subject: Some("alice".to_owned()),
        scope: "read write".to_owned(),
        metadata: BTreeMap::from([("Department".to_owned(), "Engineering".to_owned())]),
    })
}

/// The plaintext tokens of one issue: the test keeps them, the store only sees digests.
#[derive(Clone)]
pub struct Pair {
    pub access: String,
    pub refresh: String,
    pub family: FamilyId,
}

/// An issue of a new family for `store` with the given lifetimes, and its plaintext tokens.
pub fn new_issue(
    store: &dyn TokenStore,
    grant: Arc<Grant>,
    now: UnixTime,
    access_ttl: i64,
    refresh_ttl: i64,
) -> (Issue, Pair) {
    let (access, access_digest) = mint(store);
    let (refresh, refresh_digest) = mint(store);
    let pair = Pair {
        access,
        refresh,
        family: FamilyId::random(),
    };
    let issue = Issue {
        grant,
        family: pair.family,
        generation: 0,
        issued_at: now,
        access: NewToken {
            digest: access_digest,
            expires_at: now + access_ttl,
        },
        refresh: Some(NewToken {
            digest: refresh_digest,
            expires_at: now + refresh_ttl,
        }),
        replay: None,
        access_grant: None,
    };
    (issue, pair)
}

/// Issues a new family for `client_id` with the default lifetimes.
pub async fn issue_pair(store: &SharedStore, client_id: &str, now: UnixTime) -> Pair {
    let (issue, pair) = new_issue(&**store, grant(client_id), now, ACCESS_TTL, REFRESH_TTL);
    store.issue(issue).await.expect("issue");
    pair
}

/// A successor for a rotation (family and generation are the store's business), and its
/// plaintext tokens.
pub fn successor(
    store: &dyn TokenStore,
    grant: Arc<Grant>,
    now: UnixTime,
    replay: Option<Replay>,
) -> (Issue, Pair) {
    let (mut issue, pair) = new_issue(store, grant, now, ACCESS_TTL, REFRESH_TTL);
    issue.replay = replay;
    (issue, pair)
}

/// A decision that always rotates into `issue`.
pub fn rotate_to(issue: Issue) -> impl Fn(&RefreshToken) -> RotateDecision + Send + Sync {
    move |_| RotateDecision::Rotate(issue.clone())
}

async fn rotate(
    store: &SharedStore,
    refresh: &str,
    client_id: &str,
    now: UnixTime,
    decide: &Decide<'_>,
) -> RotateOutcome {
    store
        .rotate(&store.token_digest(refresh), client_id, now, decide)
        .await
        .expect("rotate")
}

/// Rotates `refresh` into a fresh successor for [`CLIENT`] (with `replay`, if any); panics
/// unless the rotation happened. Returns the consumed token and the successor's tokens.
pub async fn rotate_ok(
    store: &SharedStore,
    refresh: &str,
    now: UnixTime,
    replay: Option<Replay>,
) -> (RefreshToken, Pair) {
    let (issue, next) = successor(&**store, grant(CLIENT), now, replay);
    match rotate(store, refresh, CLIENT, now, &rotate_to(issue)).await {
        RotateOutcome::Rotated { consumed } => (consumed, next),
        other => panic!("expected Rotated, got {other:?}"),
    }
}

async fn lookup(store: &SharedStore, access: &str, now: UnixTime) -> Option<AccessToken> {
    store
        .access_token(&store.token_digest(access), now)
        .await
        .expect("access_token")
}

async fn live(store: &SharedStore, now: UnixTime) -> u64 {
    store.count_live(now).await.expect("count_live")
}

/// An issued access token is found with its grant; unknown digests and refresh tokens are not
/// access tokens.
pub async fn issue_and_lookup(store: SharedStore) {
    let now = crate::now();
    let pair = issue_pair(&store, CLIENT, now).await;
    let found = lookup(&store, &pair.access, now)
        .await
        .expect("issued token is found");
    assert_eq!(*found.grant, *grant(CLIENT));
    assert_eq!(found.family, pair.family);
    assert_eq!(found.issued_at, now);
    assert_eq!(found.expires_at, now + ACCESS_TTL);
    assert_eq!(lookup(&store, &token(), now).await, None, "unknown token");
    assert_eq!(
        lookup(&store, &pair.refresh, now).await,
        None,
        "a refresh token is not an access token"
    );
    assert_eq!(live(&store, now).await, 2);

    // An issue without a refresh token (client credentials) writes the access token only.
    let (mut issue, bare) = new_issue(&*store, grant(CLIENT), now, ACCESS_TTL, REFRESH_TTL);
    issue.refresh = None;
    store.issue(issue).await.expect("issue");
    assert!(lookup(&store, &bare.access, now).await.is_some());
    assert_eq!(live(&store, now).await, 3);
}

/// Tokens are refused from their expiry on, whether or not a purge has run.
pub async fn expiry_refused_before_purge(store: SharedStore) {
    let now = crate::now();
    let (issue, pair) = new_issue(&*store, grant(CLIENT), now, 10, 20);
    store.issue(issue).await.expect("issue");
    assert!(lookup(&store, &pair.access, now + 9).await.is_some());
    assert_eq!(
        lookup(&store, &pair.access, now + 10).await,
        None,
        "access token at its expiry"
    );
    let reject = |_: &RefreshToken| RotateDecision::Reject;
    assert_eq!(
        rotate(&store, &pair.refresh, CLIENT, now + 19, &reject).await,
        RotateOutcome::Rejected,
        "refresh token still live a second before expiry"
    );
    let (next, _) = successor(&*store, grant(CLIENT), now + 20, None);
    assert_eq!(
        rotate(&store, &pair.refresh, CLIENT, now + 20, &rotate_to(next)).await,
        RotateOutcome::Invalid,
        "refresh token at its expiry"
    );
    assert_eq!(live(&store, now + 20).await, 0);
}

/// Rotation consumes the token, hands the caller the grant, and writes the successor one
/// generation later in the same family.
pub async fn rotation_happy_path(store: SharedStore) {
    let now = crate::now();
    let pair = issue_pair(&store, CLIENT, now).await;
    let seen = AtomicUsize::new(0);
    let (next_issue, next) = successor(&*store, grant(CLIENT), now + 5, None);
    let decide = |t: &RefreshToken| {
        seen.fetch_add(1, Ordering::SeqCst);
        assert_eq!(t.generation, 0);
        assert_eq!(t.family, pair.family);
        assert_eq!(*t.grant, *grant(CLIENT));
        RotateDecision::Rotate(next_issue.clone())
    };
    let outcome = rotate(&store, &pair.refresh, CLIENT, now + 5, &decide).await;
    assert_eq!(seen.load(Ordering::SeqCst), 1, "decide runs exactly once");
    let RotateOutcome::Rotated { consumed } = outcome else {
        panic!("expected Rotated, got {outcome:?}");
    };
    assert_eq!(consumed.generation, 0);
    assert_eq!(consumed.family, pair.family);
    assert_eq!(*consumed.grant, *grant(CLIENT));
    assert_eq!(consumed.issued_at, now);
    assert_eq!(consumed.expires_at, now + REFRESH_TTL);

    let new_access = lookup(&store, &next.access, now + 5)
        .await
        .expect("successor access token");
    assert_eq!(
        new_access.family, pair.family,
        "the successor stays in the family"
    );
    assert_eq!(*new_access.grant, *grant(CLIENT));
    assert_eq!(new_access.expires_at, now + 5 + ACCESS_TTL);
    // old access token + the new pair; the consumed refresh token is not live.
    assert_eq!(live(&store, now + 5).await, 3);

    let (second, _) = rotate_ok(&store, &next.refresh, now + 6, None).await;
    assert_eq!(second.generation, 1, "generation + 1 at every rotation");
    assert_eq!(second.family, pair.family);
}

/// A rotation may issue no new refresh token (`generate: false`) and give the access token a
/// narrower scope than the grant: the access token is stored with its own scope, no refresh
/// token is written, and the presented one is consumed either way.
pub async fn rotation_without_refresh_and_narrowed_access(store: SharedStore) {
    let now = crate::now();
    let pair = issue_pair(&store, CLIENT, now).await;
    let (mut next_issue, next) = successor(&*store, grant(CLIENT), now + 5, None);
    next_issue.refresh = None;
    next_issue.access_grant = Some(Arc::new(Grant {
        scope: "read".to_owned(),
        ..(*grant(CLIENT)).clone()
    }));
    match rotate(
        &store,
        &pair.refresh,
        CLIENT,
        now + 5,
        &rotate_to(next_issue),
    )
    .await
    {
        RotateOutcome::Rotated { consumed } => assert_eq!(consumed.family, pair.family),
        other => panic!("expected Rotated, got {other:?}"),
    }
    let access = lookup(&store, &next.access, now + 5)
        .await
        .expect("the new access token");
    assert_eq!(
        access.grant.scope, "read",
        "the access token keeps its narrower scope"
    );
    assert_eq!(access.family, pair.family);
    // The old access token and the new one; no refresh token is live.
    assert_eq!(live(&store, now + 5).await, 2);
    let reject = |_: &RefreshToken| RotateDecision::Reject;
    let unwritten = rotate(&store, &next.refresh, CLIENT, now + 6, &reject).await;
    assert!(
        matches!(unwritten, RotateOutcome::Invalid),
        "the refresh token that was not issued is unknown: {unwritten:?}"
    );
    // The presented token is consumed: presenting it again is a reuse.
    let again = rotate(&store, &pair.refresh, CLIENT, now + 6, &reject).await;
    assert!(
        matches!(again, RotateOutcome::AlreadyRotated { family, replay: None } if family == pair.family),
        "a consumed token is told apart from an unknown one: {again:?}"
    );
}

/// A refresh token presented by another client is refused and stays usable by its own.
pub async fn wrong_client_leaves_token_intact(store: SharedStore) {
    let now = crate::now();
    let pair = issue_pair(&store, CLIENT, now).await;
    let called = AtomicUsize::new(0);
    let (issue, _) = successor(&*store, grant(OTHER_CLIENT), now, None);
    let decide = |_: &RefreshToken| {
        called.fetch_add(1, Ordering::SeqCst);
        RotateDecision::Rotate(issue.clone())
    };
    assert_eq!(
        rotate(&store, &pair.refresh, OTHER_CLIENT, now, &decide).await,
        RotateOutcome::WrongClient
    );
    assert_eq!(
        called.load(Ordering::SeqCst),
        0,
        "decide never sees another client's token"
    );
    assert_eq!(live(&store, now).await, 2);
    let (consumed, _) = rotate_ok(&store, &pair.refresh, now, None).await;
    assert_eq!(consumed.grant.client_id, CLIENT);
}

/// A consumed token presented again is reported as reuse, with its family.
pub async fn reuse_after_rotation(store: SharedStore) {
    let now = crate::now();
    let pair = issue_pair(&store, CLIENT, now).await;
    rotate_ok(&store, &pair.refresh, now, None).await;
    let (issue, _) = successor(&*store, grant(CLIENT), now + 1, None);
    assert_eq!(
        rotate(&store, &pair.refresh, CLIENT, now + 1, &rotate_to(issue)).await,
        RotateOutcome::AlreadyRotated {
            family: pair.family,
            replay: None
        }
    );
    assert_eq!(
        rotate(&store, &token(), CLIENT, now + 1, &|_| {
            RotateDecision::Reject
        })
        .await,
        RotateOutcome::Invalid,
        "an unknown token is not reuse"
    );
    assert_eq!(
        rotate(&store, &pair.access, CLIENT, now + 1, &|_| {
            RotateDecision::Reject
        })
        .await,
        RotateOutcome::Invalid,
        "an access token is not a refresh token"
    );
}

/// A rejected rotation changes nothing: the token is still live and rotates afterwards.
pub async fn reject_changes_nothing(store: SharedStore) {
    let now = crate::now();
    let pair = issue_pair(&store, CLIENT, now).await;
    assert_eq!(
        rotate(&store, &pair.refresh, CLIENT, now, &|_| {
            RotateDecision::Reject
        })
        .await,
        RotateOutcome::Rejected
    );
    assert_eq!(live(&store, now).await, 2);
    let (consumed, _) = rotate_ok(&store, &pair.refresh, now, None).await;
    assert_eq!(consumed.generation, 0);
}

/// Revoking one token refuses it from then on and reports whether it was live.
pub async fn revoke_token(store: SharedStore) {
    let now = crate::now();
    let pair = issue_pair(&store, CLIENT, now).await;
    let other = issue_pair(&store, CLIENT, now).await;
    assert!(
        store
            .revoke_token(&store.token_digest(&pair.access))
            .await
            .expect("revoke")
    );
    assert_eq!(lookup(&store, &pair.access, now).await, None);
    assert!(
        !store
            .revoke_token(&store.token_digest(&pair.access))
            .await
            .expect("revoke"),
        "already revoked"
    );
    assert!(
        store
            .revoke_token(&store.token_digest(&pair.refresh))
            .await
            .expect("revoke")
    );
    let (issue, _) = successor(&*store, grant(CLIENT), now, None);
    assert_eq!(
        rotate(&store, &pair.refresh, CLIENT, now, &rotate_to(issue)).await,
        RotateOutcome::Invalid
    );
    assert!(
        !store
            .revoke_token(&store.token_digest(&token()))
            .await
            .expect("revoke"),
        "unknown token"
    );
    assert!(
        lookup(&store, &other.access, now).await.is_some(),
        "other tokens untouched"
    );
    assert_eq!(live(&store, now).await, 2);
}

/// Whether the store counts the live tokens a family revocation takes: the SQL stores do, the
/// memory store revokes at once and removes the tokens at its next purge.
fn counts_revoked(store: &SharedStore) -> bool {
    store.kind() != "memory"
}

/// Revoking a family kills every access and refresh token descended from the grant, and
/// nothing else, before and after the purge that follows.
pub async fn revoke_family(store: SharedStore) {
    let now = crate::now();
    let pair = issue_pair(&store, CLIENT, now).await;
    let (_, next) = rotate_ok(&store, &pair.refresh, now, None).await;
    let bystander = issue_pair(&store, CLIENT, now).await;
    assert_eq!(live(&store, now).await, 5);

    // old access, new access, new refresh (the consumed token was not live).
    assert_eq!(
        store
            .revoke_family(pair.family)
            .await
            .expect("revoke_family"),
        counts_revoked(&store).then_some(3)
    );
    for purged in [false, true] {
        assert_eq!(lookup(&store, &pair.access, now).await, None, "{purged}");
        assert_eq!(lookup(&store, &next.access, now).await, None, "{purged}");
        assert!(
            !store
                .revoke_token(&store.token_digest(&next.access))
                .await
                .expect("revoke_token"),
            "purged: {purged}: a revoked token is not live"
        );
        let (issue, _) = successor(&*store, grant(CLIENT), now, None);
        assert_eq!(
            rotate(
                &store,
                &next.refresh,
                CLIENT,
                now,
                &rotate_to(issue.clone())
            )
            .await,
            RotateOutcome::Invalid,
            "purged: {purged}"
        );
        assert!(
            !matches!(
                rotate(&store, &pair.refresh, CLIENT, now, &rotate_to(issue)).await,
                RotateOutcome::Rotated { .. }
            ),
            "purged: {purged}: a consumed token of a revoked family never rotates"
        );
        assert!(lookup(&store, &bystander.access, now).await.is_some());
        assert_eq!(live(&store, now).await, 2, "purged: {purged}");
        if !purged {
            store.purge_expired(now).await.expect("purge");
        }
    }
    assert_eq!(
        store
            .revoke_family(pair.family)
            .await
            .expect("revoke_family"),
        counts_revoked(&store).then_some(0),
        "nothing left"
    );
    assert!(lookup(&store, &bystander.access, now).await.is_some());
}

/// The purge removes what has expired (tombstones included), reports how many, and leaves
/// the rest.
pub async fn purge_removes_expired(store: SharedStore) {
    let now = crate::now();
    let (issue, short) = new_issue(&*store, grant(CLIENT), now, 10, 20);
    store.issue(issue).await.expect("issue");
    let long = issue_pair(&store, CLIENT, now).await;
    let (_, next) = rotate_ok(&store, &long.refresh, now, None).await;

    assert_eq!(store.purge_expired(now + 5).await.expect("purge"), 0);
    assert_eq!(
        store.purge_expired(now + 10).await.expect("purge"),
        1,
        "short access token"
    );
    assert_eq!(
        lookup(&store, &short.access, now).await,
        None,
        "purged: gone even when looked up at an instant it was valid"
    );
    assert_eq!(
        store.purge_expired(now + 20).await.expect("purge"),
        1,
        "short refresh token"
    );
    assert!(lookup(&store, &long.access, now + 20).await.is_some());
    assert!(lookup(&store, &next.access, now + 20).await.is_some());
    assert_eq!(live(&store, now + 20).await, 3);
    // long access, long refresh (a consumed tombstone), successor access and refresh.
    assert_eq!(
        store
            .purge_expired(now + REFRESH_TTL + 1)
            .await
            .expect("purge"),
        4
    );
    assert_eq!(
        store
            .purge_expired(now + REFRESH_TTL + 1)
            .await
            .expect("purge"),
        0
    );
    assert_eq!(
        live(&store, now).await,
        0,
        "purged entries are gone, not merely expired"
    );
}

/// Live means unexpired, unconsumed and unrevoked, access and refresh tokens together.
pub async fn count_live(store: SharedStore) {
    let now = crate::now();
    assert_eq!(live(&store, now).await, 0);
    let a = issue_pair(&store, CLIENT, now).await;
    let b = issue_pair(&store, CLIENT, now).await;
    issue_pair(&store, OTHER_CLIENT, now).await;
    assert_eq!(live(&store, now).await, 6);
    rotate_ok(&store, &a.refresh, now, None).await;
    assert_eq!(live(&store, now).await, 7);
    assert!(
        store
            .revoke_token(&store.token_digest(&b.access))
            .await
            .expect("revoke")
    );
    assert_eq!(live(&store, now).await, 6);
    // Access tokens expire first: three refresh tokens remain (a's first one was consumed).
    assert_eq!(live(&store, now + ACCESS_TTL).await, 3);
    assert_eq!(live(&store, now + REFRESH_TTL).await, 0);
}

/// Of 50 concurrent rotations of one token exactly one wins, the others see reuse, and the
/// family ends with exactly one live refresh token (C1). Three rounds.
pub async fn concurrent_rotation(store: SharedStore) {
    const TASKS: usize = 50;
    for round in 0..3 {
        let now = crate::now();
        let pair = issue_pair(&store, CLIENT, now).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut tasks = Vec::with_capacity(TASKS);
        for _ in 0..TASKS {
            let (store, barrier, refresh) = (store.clone(), barrier.clone(), pair.refresh.clone());
            tasks.push(tokio::spawn(async move {
                let (issue, next) = successor(&*store, grant(CLIENT), now, None);
                barrier.wait().await;
                let outcome = store
                    .rotate(
                        &store.token_digest(&refresh),
                        CLIENT,
                        now,
                        &rotate_to(issue),
                    )
                    .await
                    .expect("rotate under contention must not fail");
                (outcome, next)
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.expect("task") {
                (RotateOutcome::Rotated { .. }, next) => winners.push(next),
                (RotateOutcome::AlreadyRotated { family, .. }, _) => {
                    assert_eq!(family, pair.family)
                }
                (other, _) => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one rotation wins");
        // The old access token, plus one new access and one new refresh token.
        assert_eq!(
            live(&store, now).await,
            3,
            "round {round}: one successor pair only"
        );
        assert!(lookup(&store, &winners[0].access, now).await.is_some());
        let (consumed, _) = rotate_ok(&store, &winners[0].refresh, now, None).await;
        assert_eq!(consumed.generation, 1);
        store.revoke_family(pair.family).await.expect("revoke");
        assert_eq!(
            live(&store, now).await,
            0,
            "round {round}: the family is gone"
        );
    }
}

/// The sealed response is handed back only for the immediate predecessor of the live token,
/// and only inside its window (C4).
pub async fn replay_only_for_immediate_predecessor(store: SharedStore) {
    let now = crate::now();
    let r0 = issue_pair(&store, CLIENT, now).await;
    let replay0 = Replay {
        sealed: b"sealed response 0".to_vec(),
        until: now + 30,
    };
    let (_, r1) = rotate_ok(&store, &r0.refresh, now, Some(replay0.clone())).await;
    let present = |refresh: String, at: UnixTime| {
        let store = store.clone();
        async move {
            let (issue, _) = successor(&*store, grant(CLIENT), at, None);
            rotate(&store, &refresh, CLIENT, at, &rotate_to(issue)).await
        }
    };
    assert_eq!(
        present(r0.refresh.clone(), now + 29).await,
        RotateOutcome::AlreadyRotated {
            family: r0.family,
            replay: Some(replay0.clone())
        },
        "inside the window"
    );
    assert_eq!(
        present(r0.refresh.clone(), now + 30).await,
        RotateOutcome::AlreadyRotated {
            family: r0.family,
            replay: None
        },
        "window over"
    );

    let replay1 = Replay {
        sealed: b"sealed response 1".to_vec(),
        until: now + 31,
    };
    rotate_ok(&store, &r1.refresh, now + 1, Some(replay1.clone())).await;
    assert_eq!(
        present(r1.refresh.clone(), now + 2).await,
        RotateOutcome::AlreadyRotated {
            family: r0.family,
            replay: Some(replay1)
        }
    );
    assert_eq!(
        present(r0.refresh.clone(), now + 2).await,
        RotateOutcome::AlreadyRotated {
            family: r0.family,
            replay: None
        },
        "no longer the immediate predecessor"
    );
}

/// S1: after issuing, rotating (with a replay) and revoking, a dump of the store's storage
/// contains no token. `dump` returns every byte the store keeps (files or a table dump).
/// The dump must show at least one digest, as raw bytes or hex, so an empty or unrelated dump
/// cannot pass.
pub async fn no_token_at_rest<F, Fut>(store: SharedStore, dump: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Vec<u8>>,
{
    let now = crate::now();
    let mut tokens = Vec::new();
    for _ in 0..5 {
        let pair = issue_pair(&store, CLIENT, now).await;
        let replay = Replay {
            sealed: b"opaque ciphertext".to_vec(),
            until: now + 30,
        };
        let (_, next) = rotate_ok(&store, &pair.refresh, now, Some(replay)).await;
        tokens.extend([pair.access, pair.refresh, next.access.clone(), next.refresh]);
        store
            .revoke_token(&store.token_digest(&next.access))
            .await
            .expect("revoke");
    }
    let bytes = dump().await;
    let digest = store.token_digest(&tokens[0]);
    assert!(
        contains(&bytes, digest.as_bytes()) || contains(&bytes, digest.to_hex().as_bytes()),
        "the dump ({} bytes) does not show the stored digests: it is not a dump of this store",
        bytes.len()
    );
    let leaked = tokens
        .iter()
        .filter(|t| contains(&bytes, t.as_bytes()))
        .count();
    assert_eq!(
        leaked,
        0,
        "{leaked} of {} tokens found in plaintext at rest",
        tokens.len()
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The client registry contract, for every [`ClientRegistry`] backend (a fresh, empty one).
pub async fn registry_contract(registry: crate::clients::SharedRegistry) {
    use crate::clients::{ClientApplication, RegistryError};
    let secret = crate::clients::generate_secret();
    let app = ClientApplication {
        client_id: "app-1".to_owned(),
        name: "First app".to_owned(),
        secret_digest: Digest::of(&secret),
        enabled: true,
        scopes: vec!["read".to_owned(), "write".to_owned()],
        grant_types: vec!["refresh_token".to_owned()],
        created_at: 1_700_000_000,
    };
    assert_eq!(registry.get("app-1").await.expect("get"), None);
    registry.add(app.clone()).await.expect("add");
    let found = registry
        .get("app-1")
        .await
        .expect("get")
        .expect("added app is found");
    assert_eq!(*found, app);
    assert!(found.verify_secret(&secret));
    assert!(
        matches!(
            registry.add(app.clone()).await,
            Err(RegistryError::Invalid(_))
        ),
        "duplicate id"
    );

    let mut second = app.clone();
    second.client_id = "app-0".to_owned();
    second.scopes.clear();
    registry.add(second.clone()).await.expect("add");
    let ids: Vec<String> = registry
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|a| a.client_id)
        .collect();
    assert_eq!(ids, ["app-0", "app-1"], "listed by id");

    registry.set_enabled("app-1", false).await.expect("disable");
    assert!(
        !registry
            .get("app-1")
            .await
            .expect("get")
            .expect("app")
            .enabled
    );
    let new_secret = crate::clients::generate_secret();
    registry
        .set_secret("app-1", Digest::of(&new_secret))
        .await
        .expect("set_secret");
    let rotated = registry.get("app-1").await.expect("get").expect("app");
    assert!(rotated.verify_secret(&new_secret) && !rotated.verify_secret(&secret));
    assert!(matches!(
        registry.set_enabled("nope", true).await,
        Err(RegistryError::NotFound(_))
    ));
    assert!(matches!(
        registry.set_secret("nope", Digest::of("x")).await,
        Err(RegistryError::NotFound(_))
    ));
}
