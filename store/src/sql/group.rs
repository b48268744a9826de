//! Group commit for SQLite: the rotations and issues of many requests share one transaction,
//! and so one `fsync`.
//!
//! With `synchronous=FULL` a commit returns once the WAL is on disk. One commit per rotation
//! made that wait the whole cost: the store did one rotation per `fsync` (about 1,000 to 1,400
//! per second on these VMs, BENCHMARKS.md of 2026-12-02) whatever the CPU had left. Here one
//! task, the writer, does the store's rotations and issues: it takes every request waiting in
//! its queue as a batch ([`batch`]: the batch's consumptions in one statement, its writes in
//! one string), then the requests that arrived meanwhile as the next batch, until the queue
//! is empty or [`MAX_GROUP`] have run, all inside one `BEGIN IMMEDIATE` transaction; then it
//! commits once, and only then answers them all. So a rotation is as durable as before (no
//! answer leaves before its commit), and one that fails, whose successor its caller rejects,
//! or whose caller went away before deciding is undone without touching the rest of the
//! group: its token is given back, and a write that fails is redone alone in a savepoint of
//! its own ([`member`]), with the rest of its batch. (A caller that goes away after it
//! decided has its rotation committed with the group, as one that goes away during a commit
//! always had: its client's retry is then a replay, which the reuse grace period covers.)
//! A request that arrives while a group commits waits for the next one: groups grow with the
//! load, and a lone request commits alone at once (no timer, nothing added when idle).
//!
//! A rotation's `decide` belongs to its caller (borrowed, not `'static`), so it runs in the
//! caller's task: the writer sends the consumed token over and waits, transaction open, for
//! the decision ([`DECIDE_WITHIN`]; a batch's callers decide together). Answers read inside
//! the group (a token already consumed, say) wait for the commit too: they may rest on an
//! earlier member's writes.
//!
//! The writer runs on the runtime that connected the store and ends when the store is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::sqlite::SqlitePool;
use sqlx::{Sqlite, Transaction};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::*;

mod batch;

/// Requests per transaction at most: enough for every connection of a busy gateway to share
/// one `fsync`, few enough that the last of a group is not held long by the others.
const MAX_GROUP: usize = 64;

/// Requests that may wait for a group; a caller beyond them waits to enqueue.
const QUEUE: usize = 1024;

/// How long the writer waits, with the group's transaction open, for a caller's decision on
/// the token it consumed. `decide` is quick; only a caller whose task is not polled any more
/// (and not dropped either) can reach this, and its rotation is then rolled back.
const DECIDE_WITHIN: Duration = Duration::from_secs(5);

/// The handle on the writer: where requests queue.
pub(super) struct Group {
    jobs: mpsc::Sender<Job>,
    /// Transactions committed by the writer.
    commits: Arc<AtomicU64>,
    /// Bulk writes ([`batch`]'s step 3) that held, so that tests can tell the bulk path ran
    /// and not only its one-by-one fallback.
    bulk_writes: Arc<AtomicU64>,
}

enum Job {
    Rotate(Rotation),
    Issue {
        issue: Issue,
        done: oneshot::Sender<StoreResult<()>>,
    },
}

struct Rotation {
    presented: Digest,
    client_id: String,
    now: UnixTime,
    /// Gets the token if the writer consumed it; dropped unsent if it did not.
    consumed: oneshot::Sender<RefreshToken>,
    decision: oneshot::Receiver<RotateDecision>,
    done: oneshot::Sender<StoreResult<RotateOutcome>>,
}

/// A member's result, held until its group commits (or fails).
enum Answer {
    Rotate(
        oneshot::Sender<StoreResult<RotateOutcome>>,
        StoreResult<RotateOutcome>,
    ),
    Issue(oneshot::Sender<StoreResult<()>>, StoreResult<()>),
}

impl Answer {
    /// Answers with the member's own result if the group committed, else with why it did not.
    /// A caller that went away is not waiting: nothing to do.
    fn send(self, group: &StoreResult<()>) {
        match self {
            Answer::Rotate(to, own) => {
                let _ = to.send(group.clone().and(own));
            }
            Answer::Issue(to, own) => {
                let _ = to.send(group.clone().and(own));
            }
        }
    }
}

impl Job {
    /// Answers a job that does not run: its group failed with `error`.
    fn fail(self, error: &StoreError) {
        match self {
            Job::Rotate(r) => {
                let _ = r.done.send(Err(error.clone()));
            }
            Job::Issue { done, .. } => {
                let _ = done.send(Err(error.clone()));
            }
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the sqlite writer has stopped".into())
}

fn undecided() -> StoreError {
    StoreError::Unavailable("the rotation was not decided in time; rolled back".into())
}

impl Group {
    /// Starts the writer on the current runtime.
    pub(super) fn start(pool: SqlitePool, write: Arc<Mutex<()>>) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let commits = Arc::new(AtomicU64::new(0));
        let bulk_writes = Arc::new(AtomicU64::new(0));
        tokio::spawn(writer(
            pool,
            write,
            queue,
            commits.clone(),
            bulk_writes.clone(),
        ));
        Group {
            jobs,
            commits,
            bulk_writes,
        }
    }

    /// Bulk writes that held so far.
    pub(super) fn bulk_writes(&self) -> u64 {
        self.bulk_writes.load(Ordering::Relaxed)
    }

    /// Transactions committed so far.
    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    async fn enqueue(&self, job: Job) -> StoreResult<()> {
        self.jobs.send(job).await.map_err(|_| stopped())
    }

    pub(super) async fn issue(&self, issue: Issue) -> StoreResult<()> {
        let (done, answer) = oneshot::channel();
        self.enqueue(Job::Issue { issue, done }).await?;
        answer.await.map_err(|_| stopped())?
    }

    pub(super) async fn rotate(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &Decide<'_>,
    ) -> StoreResult<RotateOutcome> {
        let (consumed, consumed_rx) = oneshot::channel();
        let (decision_tx, decision) = oneshot::channel();
        let (done, answer) = oneshot::channel();
        self.enqueue(Job::Rotate(Rotation {
            presented: *presented,
            client_id: client_id.to_owned(),
            now,
            consumed,
            decision,
            done,
        }))
        .await?;
        if let Ok(token) = consumed_rx.await {
            // The writer holds the token consumed in its open transaction until this arrives.
            let _ = decision_tx.send(decide(&token));
        }
        answer.await.map_err(|_| stopped())?
    }
}

async fn writer(
    pool: SqlitePool,
    write: Arc<Mutex<()>>,
    mut queue: mpsc::Receiver<Job>,
    commits: Arc<AtomicU64>,
    bulk_writes: Arc<AtomicU64>,
) {
    while let Some(first) = queue.recv().await {
        let _serial = write.lock().await;
        if commit(&pool, first, &mut queue, &bulk_writes).await {
            commits.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One group: its jobs in batches ([`batch::run`]), one commit, then the answers. Returns
/// whether the group committed.
///
/// The group starts with `first` and every job waiting behind it. Jobs that arrive while a
/// batch runs make the next batch of the same group, until the queue is empty or the group is
/// full: under steady load the group grows instead of leaving the late ones a commit (and an
/// `fsync`) of their own.
async fn commit(
    pool: &SqlitePool,
    first: Job,
    queue: &mut mpsc::Receiver<Job>,
    bulk_writes: &AtomicU64,
) -> bool {
    let mut tx = match pool.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => {
            // Only `first` belongs to this group; the queue waits for the next one.
            first.fail(&map_err(e));
            return false;
        }
    };
    let mut answers = Vec::with_capacity(MAX_GROUP);
    let mut jobs = vec![first];
    loop {
        while answers.len() + jobs.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if jobs.is_empty() {
            break;
        }
        if let Err(e) = batch::run(
            &mut tx,
            std::mem::take(&mut jobs),
            &mut answers,
            bulk_writes,
        )
        .await
        {
            // A savepoint or an undo failed: the transaction is in doubt, so none of it is
            // kept (dropping `tx` rolls it back).
            let failed = Err(e);
            answers.into_iter().for_each(|a| a.send(&failed));
            return false;
        }
    }
    let committed = tx.commit().await.map_err(map_err);
    let ok = committed.is_ok();
    answers.into_iter().for_each(|a| a.send(&committed));
    ok
}

/// A member's statements, each with its savepoint's own statements in the same string, so
/// that they cost no extra round trip to the connection's thread: the savepoint opens with the
/// first statement (the consumption, or an issue's writes) and is released with the last
/// write. A member that wrote nothing (its token could not be consumed, or it was rejected) or
/// failed anywhere is undone with [`ROLLBACK_MEMBER`], its savepoint still open.
struct InGroup {
    consume: String,
    write: String,
    issue: String,
}

static IN_GROUP: LazyLock<InGroup> = LazyLock::new(|| InGroup {
    consume: format!("SAVEPOINT member; {CONSUME_REFRESH}"),
    write: format!("{WRITE_ISSUE_SQLITE}; RELEASE member"),
    issue: format!("SAVEPOINT member; {WRITE_ISSUE_SQLITE}; RELEASE member"),
});

/// Undoes a member that wrote nothing, was rejected or failed: back to its savepoint, which is
/// released.
const ROLLBACK_MEMBER: &str = "ROLLBACK TO member; RELEASE member";

/// Runs one job in a savepoint, kept if the job wrote what it should and rolled back if not:
/// what a batch cannot do in bulk ([`batch`]). Returns the job's answer and whether the
/// savepoint's own statements succeeded (if not, the transaction is in doubt).
async fn member(tx: &mut Transaction<'static, Sqlite>, job: Job) -> (Answer, StoreResult<()>) {
    let sql = &*IN_GROUP;
    let (answer, undo) = match job {
        Job::Rotate(r) => {
            let Rotation {
                presented,
                client_id,
                now,
                consumed,
                decision,
                done,
            } = r;
            let statements = (sql.consume.as_str(), PROBE_REFRESH, sql.write.as_str());
            let result = rotate_in_tx!(*tx, statements, &presented, &client_id, now, |token| ask(
                consumed, decision, token
            )
            .await);
            // Written: the savepoint was released by the last statement. Anything else
            // (probed, rejected, failed at any step, the probe included): it is still open.
            let undo = !matches!(result, Ok((_, true)));
            (
                Answer::Rotate(done, result.map(|(outcome, _)| outcome)),
                undo,
            )
        }
        Job::Issue { issue, done } => {
            let (family, generation) = (family_bytes(issue.family), i64::from(issue.generation));
            let result = write_issue!(*tx, &sql.issue, &issue, family, generation, None, None);
            let undo = result.is_err();
            (Answer::Issue(done, result), undo)
        }
    };
    if !undo {
        return (answer, Ok(()));
    }
    // Fails if the savepoint is gone (it was never opened, or SQLite rolled the whole
    // transaction back after an I/O error): then nothing of the group can be trusted, and the
    // whole group fails. (A member that fails before its first statement would take that
    // path too; none can today: the only step before it serializes a map of strings.)
    let undone = sqlx::query(ROLLBACK_MEMBER).execute(&mut **tx).await;
    (answer, undone.map(|_| ()).map_err(map_err))
}

/// Hands the consumed token to the caller's task and waits for its decision.
async fn ask(
    consumed: oneshot::Sender<RefreshToken>,
    decision: oneshot::Receiver<RotateDecision>,
    token: &RefreshToken,
) -> StoreResult<RotateDecision> {
    consumed.send(token.clone()).map_err(|_| undecided())?;
    match tokio::time::timeout(DECIDE_WITHIN, decision).await {
        Ok(Ok(decision)) => Ok(decision),
        _ => Err(undecided()),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::Poll;

    use super::*;
    use crate::config::SqlConfig;
    use crate::testing::{ACCESS_TTL, CLIENT, Pair, REFRESH_TTL, grant, new_issue, successor};

    async fn sqlite() -> (SqlStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("tokens.db").display());
        let store = SqlStore::connect(&SqlConfig::new(url))
            .await
            .expect("sqlite store");
        (store, dir)
    }

    fn commits(store: &SqlStore) -> u64 {
        store.sqlite_commits().expect("a sqlite store")
    }

    fn bulk_writes(store: &SqlStore) -> u64 {
        store.sqlite_bulk_writes().expect("a sqlite store")
    }

    /// [`crate::testing::issue_pair`] for a store held as itself, not as a `SharedStore`.
    async fn pair(store: &SqlStore, now: UnixTime) -> Pair {
        let (issue, pair) = new_issue(store, grant(CLIENT), now, ACCESS_TTL, REFRESH_TTL);
        store.issue(issue).await.expect("issue");
        pair
    }

    async fn rotate(
        store: &SqlStore,
        refresh: &str,
        now: UnixTime,
        accept: bool,
    ) -> StoreResult<RotateOutcome> {
        let (issue, _) = successor(store, grant(CLIENT), now, None);
        let decide = move |_: &RefreshToken| {
            if accept {
                RotateDecision::Rotate(issue.clone())
            } else {
                RotateDecision::Reject
            }
        };
        store
            .rotate(&Digest::of(refresh), CLIENT, now, &decide)
            .await
    }

    /// Asserts that `refresh` rotates now (it was not consumed).
    async fn assert_rotates(store: &SqlStore, refresh: &str, now: UnixTime) {
        let again = rotate(store, refresh, now, true).await;
        assert!(
            matches!(again, Ok(RotateOutcome::Rotated { .. })),
            "{again:?}"
        );
    }

    async fn access_stored(store: &SqlStore, access: &str, now: UnixTime) -> bool {
        store
            .access_token(&Digest::of(access), now)
            .await
            .expect("lookup")
            .is_some()
    }

    /// Requests that arrive together share one commit, and each gets its own answer.
    #[tokio::test]
    async fn a_burst_of_rotations_shares_commits() {
        let (store, _dir) = sqlite().await;
        let now = crate::now();
        let mut pairs = Vec::new();
        for _ in 0..64 {
            pairs.push(pair(&store, now).await);
        }
        let (before, bulk_before) = (commits(&store), bulk_writes(&store));
        let rotations = pairs.iter().map(|p| rotate(&store, &p.refresh, now, true));
        for outcome in futures_util::future::join_all(rotations).await {
            assert!(
                matches!(outcome, Ok(RotateOutcome::Rotated { .. })),
                "{outcome:?}"
            );
        }
        let commits = commits(&store) - before;
        assert!(commits <= 2, "64 rotations made {commits} commits");
        let bulk = bulk_writes(&store) - bulk_before;
        assert!(
            (1..=commits).contains(&bulk),
            "{bulk} bulk writes in {commits} commits: the batches were written one by one"
        );
        for p in &pairs {
            assert!(matches!(
                rotate(&store, &p.refresh, now, true).await,
                Ok(RotateOutcome::AlreadyRotated { .. })
            ));
        }
    }

    /// A request that arrives while a group runs joins it: the second rotation is queued by the
    /// first one's `decide`, when the writer has begun the group with the first alone, and
    /// both commit together. (With the group fixed when it began, they made two commits.)
    #[tokio::test]
    async fn a_request_arriving_during_a_group_joins_it() {
        let (store, _dir) = sqlite().await;
        let now = crate::now();
        let (early, late) = (pair(&store, now).await, pair(&store, now).await);
        let Backend::Sqlite { group, .. } = &store.backend else {
            unreachable!("a sqlite store")
        };
        let (consumed, consumed_rx) = oneshot::channel();
        let (decision_tx, decision) = oneshot::channel();
        let (done, answer) = oneshot::channel();
        let late_job = std::sync::Mutex::new(Some(Job::Rotate(Rotation {
            presented: Digest::of(&late.refresh),
            client_id: CLIENT.to_owned(),
            now,
            consumed,
            decision,
            done,
        })));
        let (issue, _) = successor(&store, grant(CLIENT), now, None);
        let decide = |_: &RefreshToken| {
            // The first member's savepoint is open: queue the second now.
            if let Some(job) = late_job.lock().unwrap().take() {
                assert!(group.jobs.try_send(job).is_ok(), "room in the queue");
            }
            RotateDecision::Rotate(issue.clone())
        };
        let before = commits(&store);
        let presented = Digest::of(&early.refresh);
        let first = store.rotate(&presented, CLIENT, now, &decide);
        let second = async {
            consumed_rx
                .await
                .expect("the second rotation consumed its token");
            let (next, _) = successor(&store, grant(CLIENT), now, None);
            assert!(decision_tx.send(RotateDecision::Rotate(next)).is_ok());
            answer.await.expect("the second rotation answered")
        };
        let (first, second) = tokio::join!(first, second);
        assert!(
            matches!(first, Ok(RotateOutcome::Rotated { .. })),
            "{first:?}"
        );
        assert!(
            matches!(second, Ok(RotateOutcome::Rotated { .. })),
            "{second:?}"
        );
        assert_eq!(commits(&store) - before, 1, "one group for both");
    }

    /// One batch that writes in bulk: an accepted rotation, a rejected one and an issue. The
    /// rejected token is given back (it rotates afterwards), the others hold.
    #[tokio::test]
    async fn a_rejection_in_a_bulk_batch_gives_its_token_back() {
        let (store, _dir) = sqlite().await;
        let now = crate::now();
        let (kept, rejected) = (pair(&store, now).await, pair(&store, now).await);
        let (fresh_issue, fresh) = new_issue(&store, grant(CLIENT), now, ACCESS_TTL, REFRESH_TTL);
        let (before, bulk_before) = (commits(&store), bulk_writes(&store));
        let (a, b, c) = tokio::join!(
            rotate(&store, &kept.refresh, now, true),
            rotate(&store, &rejected.refresh, now, false),
            store.issue(fresh_issue),
        );
        assert_eq!(commits(&store) - before, 1, "one group");
        assert_eq!(
            bulk_writes(&store) - bulk_before,
            1,
            "written in bulk, not one by one"
        );
        assert!(matches!(a, Ok(RotateOutcome::Rotated { .. })), "{a:?}");
        assert!(matches!(b, Ok(RotateOutcome::Rejected)), "{b:?}");
        assert!(c.is_ok(), "{c:?}");
        assert!(matches!(
            rotate(&store, &kept.refresh, now, true).await,
            Ok(RotateOutcome::AlreadyRotated { .. })
        ));
        assert_rotates(&store, &rejected.refresh, now).await;
        assert!(access_stored(&store, &fresh.access, now).await);
    }

    /// In one group: a failed write, a rejected successor and a second rotation of the same
    /// token each get their own answer; what the others wrote is kept, theirs is not.
    #[tokio::test]
    async fn a_member_that_fails_or_is_rejected_leaves_the_rest_of_its_group() {
        let (store, _dir) = sqlite().await;
        let now = crate::now();
        let (kept, rejected) = (pair(&store, now).await, pair(&store, now).await);
        // The same digests again: the primary key refuses them.
        let (mut duplicate, _) = new_issue(&store, grant(CLIENT), now, ACCESS_TTL, REFRESH_TTL);
        duplicate.access.digest = Digest::of(&kept.access);
        let (fresh_issue, fresh) = new_issue(&store, grant(CLIENT), now, ACCESS_TTL, REFRESH_TTL);
        let before = commits(&store);
        let (a, b, c, d, e) = tokio::join!(
            rotate(&store, &kept.refresh, now, true),
            store.issue(duplicate),
            rotate(&store, &rejected.refresh, now, false),
            rotate(&store, &kept.refresh, now, true),
            store.issue(fresh_issue),
        );
        assert_eq!(commits(&store) - before, 1, "one group");
        assert!(matches!(a, Ok(RotateOutcome::Rotated { .. })), "{a:?}");
        assert!(matches!(b, Err(StoreError::Backend(_))), "{b:?}");
        assert_eq!(c.unwrap(), RotateOutcome::Rejected);
        assert!(
            matches!(d, Ok(RotateOutcome::AlreadyRotated { .. })),
            "{d:?}"
        );
        e.expect("a fresh issue beside a failed one");
        // The rejected token was not consumed; the fresh family was written.
        assert_rotates(&store, &rejected.refresh, now).await;
        assert!(access_stored(&store, &fresh.access, now).await);
    }

    /// A member whose probe fails (a row that cannot be read back) fails alone; the group's
    /// other members commit.
    #[tokio::test]
    async fn a_failed_probe_fails_its_member_only() {
        let (store, _dir) = sqlite().await;
        let now = crate::now();
        let good = pair(&store, now).await;
        let Backend::Sqlite { pool, .. } = &store.backend else {
            unreachable!("a sqlite store")
        };
        // A consumed refresh token whose family id is one byte: the probe cannot decode it.
        sqlx::query(
            "INSERT INTO refresh_tokens (digest, client_id, scope, metadata, issued_at, \
             expires_at, family, generation, consumed_at) \
             VALUES ($1, $2, 'read', '{}', $3, $4, x'00', 0, $3)",
        )
        .bind(Digest::of("corrupt").as_bytes().as_slice())
        .bind(CLIENT)
        .bind(now)
        .bind(now + 600)
        .execute(pool)
        .await
        .expect("insert the corrupt row");
        let before = commits(&store);
        let (bad, fine) = tokio::join!(
            rotate(&store, "corrupt", now, true),
            rotate(&store, &good.refresh, now, true),
        );
        assert_eq!(commits(&store) - before, 1, "one group, committed");
        assert!(matches!(bad, Err(StoreError::Backend(_))), "{bad:?}");
        assert!(
            matches!(fine, Ok(RotateOutcome::Rotated { .. })),
            "{fine:?}"
        );
    }

    /// A batch whose consumption fails fails its group: nothing of it is committed, every
    /// caller gets the error, and the tokens stay usable once the store works again.
    #[tokio::test]
    async fn a_failed_consumption_fails_its_group_and_consumes_nothing() {
        let (store, _dir) = sqlite().await;
        let now = crate::now();
        let (a, b) = (pair(&store, now).await, pair(&store, now).await);
        let Backend::Sqlite { pool, .. } = &store.backend else {
            unreachable!("a sqlite store")
        };
        sqlx::query(
            "CREATE TRIGGER no_consuming BEFORE UPDATE OF consumed_at ON refresh_tokens \
             WHEN NEW.consumed_at IS NOT NULL BEGIN SELECT RAISE(ABORT, 'disk gone'); END",
        )
        .execute(pool)
        .await
        .expect("create the trigger");
        let before = commits(&store);
        let (issue, late) = new_issue(&store, grant(CLIENT), now, ACCESS_TTL, REFRESH_TTL);
        let (ra, rb, issued) = tokio::join!(
            rotate(&store, &a.refresh, now, true),
            rotate(&store, &b.refresh, now, true),
            store.issue(issue),
        );
        assert!(matches!(ra, Err(StoreError::Backend(_))), "{ra:?}");
        assert!(matches!(rb, Err(StoreError::Backend(_))), "{rb:?}");
        assert!(matches!(issued, Err(StoreError::Backend(_))), "{issued:?}");
        assert_eq!(commits(&store), before, "nothing committed");
        sqlx::query("DROP TRIGGER no_consuming")
            .execute(pool)
            .await
            .expect("drop the trigger");
        for refresh in [&a.refresh, &b.refresh] {
            assert_rotates(&store, refresh, now).await;
        }
        assert!(
            !access_stored(&store, &late.access, now).await,
            "the failed group's issue was not written"
        );
    }

    /// A caller that goes away before it decides leaves its token unconsumed.
    #[tokio::test]
    async fn a_caller_gone_before_deciding_leaves_the_token() {
        let (store, _dir) = sqlite().await;
        let now = crate::now();
        let p = pair(&store, now).await;
        {
            let mut gone = pin!(rotate(&store, &p.refresh, now, true));
            // One poll enqueues the rotation; the future is then dropped.
            std::future::poll_fn(|cx| {
                assert!(gone.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
        }
        let before = commits(&store);
        assert!(matches!(
            rotate(&store, &p.refresh, now, true).await,
            Ok(RotateOutcome::Rotated { .. })
        ));
        assert!(commits(&store) > before);
    }
}
