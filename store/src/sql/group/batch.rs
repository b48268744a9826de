//! A batch: the jobs the writer took from its queue at once, run in three round trips to the
//! connection's thread instead of two (and a wait for the caller) per job.
//!
//! 1. One `UPDATE ... FROM (VALUES ...) RETURNING` consumes every presented refresh token that
//!    can be consumed.
//! 2. Every caller whose token was consumed is handed it at once, and the writer waits for the
//!    decisions (together, within [`DECIDE_WITHIN`]).
//! 3. One string writes every accepted successor and every issue, and gives back the tokens of
//!    the rotations that were rejected or not decided: five multi-row statements inside a
//!    savepoint of the batch's own.
//!
//! Job by job, the work was three hand-offs in sequence per job (the consumption, the
//! caller's decision, the writes), each the wake-up of a thread that sleeps between them, and
//! across cores when the gateway is not pinned: about 40% of `bench sqlite-ref`'s CPU,
//! unpinned, was context switches (bench/PROFILING.md).
//!
//! Whatever the batch cannot do in bulk goes through [`member`], one job in a savepoint of its
//! own as before, after the batch: a token that could not be consumed (its probe tells why) and
//! a second rotation of a token already in the batch (it must see the first one's outcome). A
//! second rotation of a family already rotated in the batch is written after the bulk write,
//! and if the bulk write fails, every write of the batch is redone one by one, so that a
//! failure stays its own job's.
//!
//! Undoing a rotation without its savepoint: consumption sets `consumed_at` on a row where it
//! was `NULL` and changes nothing else, so setting it back to `NULL` is the exact undo.

use std::collections::HashMap;
use std::sync::OnceLock;

use tokio::time::Instant;

use super::*;

/// Parameters per row of [`write_sql`]; see there.
const WRITE_PARAMS: usize = 24;

/// [`consume_sql`] for each batch size.
static CONSUME: [OnceLock<String>; MAX_GROUP] = [const { OnceLock::new() }; MAX_GROUP];
/// [`write_sql`] for each batch size.
static WRITE: [OnceLock<String>; MAX_GROUP] = [const { OnceLock::new() }; MAX_GROUP];

/// `$1`, `$2`, ... in rows of `width`, `n` rows: `($1, $2), ($3, $4)`.
fn values(n: usize, width: usize, first: usize, stride: usize) -> String {
    (0..n)
        .map(|row| {
            let cells: Vec<String> = (0..width)
                .map(|c| format!("${}", row * stride + first + c))
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Consumes `n` presented tokens: rows of (digest, client id, now), the conditions of
/// [`CONSUME_REFRESH`] for each. Digests are distinct within a batch.
fn consume_sql(n: usize) -> &'static str {
    CONSUME[n - 1].get_or_init(|| {
        format!(
            "UPDATE refresh_tokens SET consumed_at = v.column3 FROM (VALUES {}) AS v \
             WHERE refresh_tokens.digest IN (SELECT column1 FROM (VALUES {digests})) \
               AND refresh_tokens.digest = v.column1 AND refresh_tokens.client_id = v.column2 \
               AND refresh_tokens.consumed_at IS NULL AND refresh_tokens.revoked = FALSE \
               AND refresh_tokens.expires_at > v.column3 \
             RETURNING digest, client_id, subject, scope, metadata, family, generation, \
               issued_at, expires_at",
            values(n, 3, 1, 3),
            digests = values(n, 1, 1, 3),
        )
    })
}

/// The writes of `n` rows of [`WRITE_PARAMS`] parameters each, in a savepoint. A row is
/// either an issue (`$1`..`$23` of the row, as in [`WRITE_ISSUE_SQLITE`]) or the undo of a
/// consumption (`$24`, the presented digest); every column of the other kind is `NULL`, which
/// each statement filters out.
fn write_sql(n: usize) -> &'static str {
    WRITE[n - 1].get_or_init(|| {
        let rows = |first, width| values(n, width, first, WRITE_PARAMS);
        format!(
            "SAVEPOINT batch; \
             INSERT INTO access_tokens \
             (digest, client_id, subject, scope, metadata, issued_at, expires_at, family, generation) \
             SELECT column1, column2, column3, column4, column5, column6, column7, column8, column9 \
             FROM (VALUES {access}) WHERE column1 IS NOT NULL; \
             INSERT INTO refresh_tokens \
             (digest, client_id, subject, scope, metadata, issued_at, expires_at, family, generation) \
             SELECT column1, column2, column3, column4, column5, column6, column7, column8, column9 \
             FROM (VALUES {refresh}) WHERE column1 IS NOT NULL; \
             UPDATE refresh_tokens SET replay = v.column2, replay_until = v.column3 \
             FROM (VALUES {replay}) AS v \
             WHERE refresh_tokens.digest = v.column1 AND v.column2 IS NOT NULL; \
             UPDATE refresh_tokens SET replay = NULL, replay_until = NULL \
             FROM (VALUES {older}) AS v \
             WHERE refresh_tokens.family IN (SELECT column1 FROM (VALUES {older})) \
               AND refresh_tokens.family = v.column1 AND refresh_tokens.generation < v.column2 \
               AND refresh_tokens.replay IS NOT NULL; \
             UPDATE refresh_tokens SET consumed_at = NULL FROM (VALUES {undo}) AS v \
             WHERE refresh_tokens.digest = v.column1; \
             RELEASE batch",
            access = rows(1, 9),
            refresh = rows(10, 9),
            replay = rows(19, 3),
            older = rows(22, 2),
            undo = rows(24, 1),
        )
    })
}

/// Gives a consumed token back, alone (the fallback of the batch's undo).
const UNCONSUME: &str = "UPDATE refresh_tokens SET consumed_at = NULL WHERE digest = $1";

/// Undoes a failed [`write_sql`], its savepoint still open.
const ROLLBACK_BATCH: &str = "ROLLBACK TO batch; RELEASE batch";

#[derive(sqlx::FromRow)]
struct Consumed {
    digest: Vec<u8>,
    #[sqlx(flatten)]
    row: ConsumedRow,
}

/// One write of the batch: an issue, with the rotation's part when it is one, and the answer
/// it gives once it holds.
struct Write {
    issue: Issue,
    access_meta: String,
    meta: String,
    family: [u8; 16],
    generation: i64,
    /// On a rotation: the presented token's digest (its replay, its undo) and its generation
    /// (the family's older generations lose their replays below it).
    rotation: Option<(Digest, i64)>,
    answer: Answer,
}

impl Write {
    fn replay(&self) -> Option<(&Digest, &Replay)> {
        self.rotation
            .as_ref()
            .map(|(presented, _)| presented)
            .zip(self.issue.replay.as_ref())
    }

    fn older(&self) -> Option<(&[u8], i64)> {
        self.rotation
            .as_ref()
            .map(|(_, generation)| (self.family.as_slice(), *generation))
    }

    /// Its answer, with `error` instead of what the write would have answered.
    fn failed(self, error: StoreError) -> Answer {
        match self.answer {
            Answer::Rotate(done, _) => Answer::Rotate(done, Err(error)),
            Answer::Issue(done, _) => Answer::Issue(done, Err(error)),
        }
    }
}

/// A rotation whose token the batch consumed, waiting for its caller's decision (`None`: its
/// caller went away).
struct Asked {
    presented: Digest,
    token: RefreshToken,
    decision: Option<oneshot::Receiver<RotateDecision>>,
    done: oneshot::Sender<StoreResult<RotateOutcome>>,
}

/// What the batch still has to do after the consumption and the decisions.
#[derive(Default)]
struct Left {
    /// In one bulk write.
    writes: Vec<Write>,
    /// Consumed tokens to give back (rejected, undecided, unreadable).
    undo: Vec<Digest>,
    /// Writes that must follow the bulk write, one by one.
    after: Vec<Write>,
    /// Jobs for [`member`], last.
    alone: Vec<Job>,
}

/// Runs `jobs` in the open transaction and pushes an answer for every one of them. `Err`: a
/// savepoint or an undo failed and the transaction is in doubt (every job has its answer
/// anyway; the group must fail).
pub(super) async fn run(
    tx: &mut Transaction<'static, Sqlite>,
    jobs: Vec<Job>,
    answers: &mut Vec<Answer>,
    bulk_writes: &AtomicU64,
) -> StoreResult<()> {
    let mut left = Left::default();
    let mut rotations: Vec<Rotation> = Vec::new();
    for job in jobs {
        match job {
            Job::Issue { issue, done } => match issue_metadata(&issue) {
                Ok((access_meta, meta)) => left.writes.push(Write {
                    family: family_bytes(issue.family),
                    generation: i64::from(issue.generation),
                    issue,
                    access_meta,
                    meta,
                    rotation: None,
                    answer: Answer::Issue(done, Ok(())),
                }),
                Err(e) => answers.push(Answer::Issue(done, Err(e))),
            },
            // A second rotation of one token must see what the first one did.
            Job::Rotate(r) if rotations.iter().any(|o| o.presented == r.presented) => {
                left.alone.push(Job::Rotate(r));
            }
            Job::Rotate(r) => rotations.push(r),
        }
    }
    let asked = match consume(tx, rotations, &mut left, answers).await {
        Ok(asked) => asked,
        Err(e) => {
            answers.extend(left.writes.into_iter().map(|w| w.failed(e.clone())));
            left.alone.into_iter().for_each(|job| job.fail(&e));
            return Err(e);
        }
    };
    decide(asked, &mut left, answers).await;
    let Left {
        writes,
        undo,
        after,
        alone,
    } = left;
    let mut rest = after.into_iter();
    let done = async {
        write(tx, writes, &undo, answers, bulk_writes).await?;
        for w in rest.by_ref() {
            write_alone(tx, w, answers).await?;
        }
        Ok::<_, StoreError>(())
    }
    .await;
    if let Err(e) = done {
        rest.for_each(|w| answers.push(w.failed(e.clone())));
        alone.into_iter().for_each(|job| job.fail(&e));
        return Err(e);
    }
    let mut alone = alone.into_iter();
    while let Some(job) = alone.next() {
        let (answer, savepoint) = member(tx, job).await;
        answers.push(answer);
        if let Err(e) = savepoint {
            alone.for_each(|job| job.fail(&e));
            return Err(e);
        }
    }
    Ok(())
}

/// Step 1: consumes what it can in one statement and hands each consumed token to its caller.
/// A token it could not consume goes to [`member`] (whose probe says why). `Err`: the
/// statement failed, and every rotation of the batch has its answer (the error). The group
/// fails with it: the errors that make this statement fail (a full disk, an I/O error) may
/// have rolled the whole transaction back, and a savepoint opened after that would start and
/// commit a transaction of its own while its callers are told that the group failed.
async fn consume(
    tx: &mut Transaction<'static, Sqlite>,
    rotations: Vec<Rotation>,
    left: &mut Left,
    answers: &mut Vec<Answer>,
) -> StoreResult<Vec<Asked>> {
    if rotations.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = sqlx::query_as::<_, Consumed>(consume_sql(rotations.len()));
    for r in &rotations {
        query = query
            .bind(r.presented.as_bytes().as_slice())
            .bind(r.client_id.as_str())
            .bind(r.now);
    }
    let rows = match query.fetch_all(&mut **tx).await {
        Ok(rows) => rows,
        Err(e) => {
            let e = map_err(e);
            rotations.into_iter().for_each(|r| Job::Rotate(r).fail(&e));
            return Err(e);
        }
    };
    let mut rows: HashMap<Vec<u8>, ConsumedRow> =
        rows.into_iter().map(|c| (c.digest, c.row)).collect();
    let mut asked = Vec::with_capacity(rows.len());
    for r in rotations {
        let Some(row) = rows.remove(r.presented.as_bytes().as_slice()) else {
            left.alone.push(Job::Rotate(r));
            continue;
        };
        let token = match consumed_from(row) {
            Ok(token) => token,
            Err(e) => {
                left.undo.push(r.presented);
                answers.push(Answer::Rotate(r.done, Err(e)));
                continue;
            }
        };
        // A caller that went away has dropped its receiver: nobody decides.
        let decision = r.consumed.send(token.clone()).is_ok().then_some(r.decision);
        asked.push(Asked {
            presented: r.presented,
            token,
            decision,
            done: r.done,
        });
    }
    Ok(asked)
}

/// Step 2: the decisions, awaited together. An accepted successor becomes a write; a rejected
/// or undecided rotation gives its token back.
async fn decide(asked: Vec<Asked>, left: &mut Left, answers: &mut Vec<Answer>) {
    let deadline = Instant::now() + DECIDE_WITHIN;
    for a in asked {
        let decision = match a.decision {
            Some(rx) => tokio::time::timeout_at(deadline, rx)
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        let outcome = match decision {
            Some(RotateDecision::Rotate(issue)) => Ok(issue),
            Some(RotateDecision::Reject) => Err(Ok(RotateOutcome::Rejected)),
            None => Err(Err(undecided())),
        };
        let issue = match outcome.and_then(|issue| {
            issue_metadata(&issue)
                .map(|metas| (issue, metas))
                .map_err(Err)
        }) {
            Ok(written) => written,
            Err(answer) => {
                left.undo.push(a.presented);
                answers.push(Answer::Rotate(a.done, answer));
                continue;
            }
        };
        let (issue, (access_meta, meta)) = issue;
        let family = family_bytes(a.token.family);
        let generation = i64::from(a.token.generation);
        let w = Write {
            issue,
            access_meta,
            meta,
            family,
            generation: generation + 1,
            rotation: Some((a.presented, generation)),
            answer: Answer::Rotate(a.done, Ok(RotateOutcome::Rotated { consumed: a.token })),
        };
        // Two rotations of one family (not expected: a family has one live refresh token)
        // keep their order: the second is written after the bulk write.
        if left
            .writes
            .iter()
            .any(|o| o.rotation.is_some() && o.family == family)
        {
            left.after.push(w);
        } else {
            left.writes.push(w);
        }
    }
}

/// Step 3: every write and every undo in one string. If it fails, it is rolled back and each
/// write is done alone, so that a failure is its own job's.
async fn write(
    tx: &mut Transaction<'static, Sqlite>,
    writes: Vec<Write>,
    undo: &[Digest],
    answers: &mut Vec<Answer>,
    bulk_writes: &AtomicU64,
) -> StoreResult<()> {
    let n = writes.len() + undo.len();
    if n == 0 {
        return Ok(());
    }
    let mut query = sqlx::query(write_sql(n));
    for w in &writes {
        query = bind_issue!(
            query,
            &w.issue,
            &w.access_meta,
            &w.meta,
            w.family.as_slice(),
            w.generation,
            w.replay(),
            w.older()
        )
        .bind(None::<&[u8]>);
    }
    for presented in undo {
        for _ in 1..WRITE_PARAMS {
            query = query.bind(None::<&[u8]>);
        }
        query = query.bind(presented.as_bytes().as_slice());
    }
    let failed = match query.execute(&mut **tx).await {
        Ok(_) => {
            bulk_writes.fetch_add(1, Ordering::Relaxed);
            answers.extend(writes.into_iter().map(|w| w.answer));
            return Ok(());
        }
        Err(e) => map_err(e),
    };
    tracing::debug!(error = %failed, "a batch's writes failed; one by one");
    let mut writes = writes.into_iter();
    let alone = async {
        sqlx::query(ROLLBACK_BATCH)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        for w in writes.by_ref() {
            write_alone(tx, w, answers).await?;
        }
        for presented in undo {
            unconsume(tx, presented).await?;
        }
        Ok::<_, StoreError>(())
    }
    .await;
    if let Err(e) = &alone {
        writes.for_each(|w| answers.push(w.failed(e.clone())));
    }
    alone
}

/// One write in a savepoint of its own; if it fails, its answer is the error and a rotation
/// gives its token back. `Err`: the savepoint or the undo failed (the transaction is in doubt).
async fn write_alone(
    tx: &mut Transaction<'static, Sqlite>,
    w: Write,
    answers: &mut Vec<Answer>,
) -> StoreResult<()> {
    let written = write_issue!(
        *tx,
        &IN_GROUP.issue,
        &w.issue,
        w.family,
        w.generation,
        w.replay(),
        w.older()
    );
    let Err(e) = written else {
        answers.push(w.answer);
        return Ok(());
    };
    let presented = w.rotation.as_ref().map(|(presented, _)| *presented);
    answers.push(w.failed(e));
    sqlx::query(ROLLBACK_MEMBER)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    match presented {
        Some(presented) => unconsume(tx, &presented).await,
        None => Ok(()),
    }
}

async fn unconsume(tx: &mut Transaction<'static, Sqlite>, presented: &Digest) -> StoreResult<()> {
    sqlx::query(UNCONSUME)
        .bind(presented.as_bytes().as_slice())
        .execute(&mut **tx)
        .await
        .map(|_| ())
        .map_err(map_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SqlConfig;

    /// The plan of each bulk statement, as SQLite (the bundled one) makes it for `n` rows.
    async fn plans(n: usize) -> Vec<(String, Vec<String>)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("tokens.db").display());
        let store = SqlStore::connect(&SqlConfig::new(url))
            .await
            .expect("sqlite store");
        let Backend::Sqlite { pool, .. } = &store.backend else {
            unreachable!("a sqlite store")
        };
        let mut out = Vec::new();
        let write = write_sql(n);
        let statements = std::iter::once(consume_sql(n).to_owned()).chain(
            write
                .split("; ")
                .filter(|s| !s.starts_with("SAVEPOINT") && !s.starts_with("RELEASE"))
                .map(str::to_owned),
        );
        for sql in statements {
            let rows: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .fetch_all(pool)
                    .await
                    .expect("a plan");
            out.push((sql, rows.into_iter().map(|r| r.3).collect()));
        }
        out
    }

    /// Every bulk statement finds its rows through an index, one lookup per row, at every
    /// batch size: the bundled SQLite, left to itself with `UPDATE ... FROM`, scanned the
    /// whole `expires_at` index to consume 64 tokens (7 ms a batch in `bench sqlite-ref`).
    #[tokio::test]
    async fn bulk_statements_look_rows_up_by_index() {
        for n in [1, 2, 7, MAX_GROUP] {
            for (sql, plan) in plans(n).await {
                assert!(
                    !plan
                        .iter()
                        .any(|step| step.starts_with("SCAN refresh_tokens")
                            || step.starts_with("SCAN access_tokens")),
                    "{n} rows: {sql}\n{plan:?}"
                );
            }
        }
    }
}
