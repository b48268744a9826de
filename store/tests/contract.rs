//! The contract suite (`store::testing`) on every store kind, plus what only one kind has:
//! the memory store's capacity bound, SQLite's file, PostgreSQL's recovery after lost connections.
//!
//! The PostgreSQL tests are ignored by default and read `TEST_DATABASE_URL`; run them with
//! `TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo test -p store -- --include-ignored`.
//! When run, they fail (never skip) if the variable is unset or the server unreachable. Each
//! one works in a fresh schema of its own, dropped at the end.

use std::sync::Arc;

use store::config::SqlConfig;
use store::memory::MemoryStore;
use store::sql::SqlStore;
use store::{SharedStore, StoreError, testing};

fn memory() -> SharedStore {
    Arc::new(MemoryStore::new(100_000))
}

struct SqliteDb {
    store: SharedStore,
    dir: tempfile::TempDir,
}

impl SqliteDb {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("nested/tokens.db")
    }
}

async fn sqlite() -> SqliteDb {
    let dir = tempfile::tempdir().expect("tempdir");
    // A folder that does not exist yet: connect creates it and the file.
    let url = format!("sqlite://{}", dir.path().join("nested/tokens.db").display());
    let store = SqlStore::connect(&SqlConfig::new(url))
        .await
        .expect("sqlite store");
    SqliteDb {
        store: Arc::new(store),
        dir,
    }
}

fn pg_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "TEST_DATABASE_URL is not set: the PostgreSQL tests need a server, e.g. \
             TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
        )
    })
}

/// A fresh schema on the test server, dropped (with everything in it) when the test ends.
struct PgSchema {
    url: String,
    name: String,
}

impl PgSchema {
    fn new() -> Self {
        PgSchema {
            url: pg_url(),
            name: format!("store_test_{:016x}", rand::random::<u64>()),
        }
    }

    fn config(&self) -> SqlConfig {
        let mut config = SqlConfig::new(self.url.clone());
        config.schema = Some(self.name.clone());
        config
    }

    async fn store(&self) -> SharedStore {
        Arc::new(self.sql_store(self.config()).await)
    }

    async fn sql_store(&self, config: SqlConfig) -> SqlStore {
        SqlStore::connect(&config).await.unwrap_or_else(|e| {
            panic!("cannot use the PostgreSQL server in TEST_DATABASE_URL: {e}")
        })
    }

    async fn admin(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url)
            .await
            .expect("admin connection to TEST_DATABASE_URL")
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    use sqlx::Connection;
                    // One attempt, bounded: a pool would retry an unreachable server for 30 s.
                    let connect = sqlx::PgConnection::connect(&url);
                    if let Ok(Ok(mut conn)) =
                        tokio::time::timeout(std::time::Duration::from_secs(3), connect).await
                    {
                        let sql = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                        let _ = sqlx::query(&sql).execute(&mut conn).await;
                    }
                });
            }
        })
        .join();
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    store::testing::$name(super::memory()).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = super::sqlite().await;
                    store::testing::$name(db.store.clone()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
                async fn $name() {
                    let schema = super::PgSchema::new();
                    store::testing::$name(schema.store().await).await;
                }
            )*
        }
    };
}

contract!(
    issue_and_lookup,
    expiry_refused_before_purge,
    rotation_happy_path,
    rotation_without_refresh_and_narrowed_access,
    wrong_client_leaves_token_intact,
    reuse_after_rotation,
    reject_changes_nothing,
    revoke_token,
    revoke_family,
    purge_removes_expired,
    count_live,
    concurrent_rotation,
    replay_only_for_immediate_predecessor,
);

#[tokio::test]
async fn memory_capacity_evicts_and_counts() {
    let store = Arc::new(MemoryStore::new(10));
    let shared: SharedStore = store.clone();
    let now = store::now();
    let mut last = None;
    for _ in 0..20 {
        last = Some(testing::issue_pair(&shared, testing::CLIENT, now).await);
    }
    let held = store.entry_count();
    assert!(held <= 10, "capacity bound: {held} entries held");
    assert_eq!(
        store.evictions(),
        40 - held,
        "every entry past the bound is counted"
    );
    let last = last.expect("issued");
    assert!(
        shared
            .access_token(&shared.token_digest(&last.access), now)
            .await
            .expect("lookup")
            .is_some(),
        "the newest token is admitted, the oldest evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_digests_only() {
    let db = sqlite().await;
    let path = db.path();
    testing::no_token_at_rest(db.store.clone(), || async move {
        let mut bytes = std::fs::read(&path).expect("database file");
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        bytes.extend(std::fs::read(wal).unwrap_or_default());
        bytes
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_is_durable_wal_and_consistent_after_reopen() {
    let db = sqlite().await;
    let now = store::now();
    let pair = testing::issue_pair(&db.store, testing::CLIENT, now).await;
    let (_, next) = testing::rotate_ok(&db.store, &pair.refresh, now, None).await;

    let url = format!("sqlite://{}", db.path().display());
    let reopened: SharedStore = Arc::new(
        SqlStore::connect(&SqlConfig::new(url.clone()))
            .await
            .expect("reopen"),
    );
    assert!(
        reopened
            .access_token(&store::Digest::of(&next.access), now)
            .await
            .expect("lookup")
            .is_some()
    );
    let again = reopened
        .rotate(
            &store::Digest::of(&pair.refresh),
            testing::CLIENT,
            now,
            &|_| store::RotateDecision::Reject,
        )
        .await
        .expect("rotate");
    assert!(
        matches!(again, store::RotateOutcome::AlreadyRotated { .. }),
        "a consumed token stays consumed across a reopen: {again:?}"
    );

    let pool = sqlx::SqlitePool::connect(&url).await.expect("inspect");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .expect("pragma");
    assert_eq!(mode, "wal");
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .expect("pragma");
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn sqlite_holds_the_client_registry() {
    let db = sqlite().await;
    let path = db.path();
    drop(db.store);
    let store = SqlStore::connect(&SqlConfig::new(format!("sqlite://{}", path.display())))
        .await
        .expect("sqlite store");
    testing::registry_contract(Arc::new(store)).await;
}

#[tokio::test]
async fn unreachable_database_is_unavailable() {
    let mut config = SqlConfig::new("postgres://nobody@127.0.0.1:1/none");
    config.connect_timeout_secs = 1;
    config.acquire_timeout_secs = 1;
    let started = std::time::Instant::now();
    match SqlStore::connect(&config).await {
        Err(StoreError::Unavailable(msg)) => assert!(!msg.contains("nobody"), "{msg}"),
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("connected to a closed port"),
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "bounded by the timeouts"
    );
}

#[tokio::test]
async fn bad_urls_are_refused_without_echoing_them() {
    for url in [
        "mysql://u:hunter2@h/db",
        "postgres://u:hunter2@h:notaport/db",
    ] {
        match SqlStore::connect(&SqlConfig::new(url)).await {
            Err(e) => assert!(!e.to_string().contains("hunter2"), "{e}"),
            Ok(_) => panic!("accepted {url:?}"),
        }
    }
}

mod postgres_only {
    use super::*;

    /// A family whose generation 0 was rotated to generation 1 with a replay window: generation
    /// 0 keeps a replay of the response that made generation 1, which a rotation of generation
    /// 1 ends. Returns generation 0, generation 1 and that replay.
    async fn family_with_a_replay(
        store: &SharedStore,
        now: store::UnixTime,
    ) -> (testing::Pair, testing::Pair, store::Replay) {
        let first = testing::issue_pair(store, testing::CLIENT, now).await;
        let replay = store::Replay {
            sealed: b"the response that issued generation 1".to_vec(),
            until: now + 60,
        };
        let (_, pair) = testing::rotate_ok(store, &first.refresh, now, Some(replay.clone())).await;
        (first, pair, replay)
    }

    /// Whether `count_waiters` (a `SELECT count(*)` of waiting backends) counts one within 10 s.
    async fn a_backend_waits(admin: &sqlx::PgPool, count_waiters: &str) -> bool {
        for _ in 0..500 {
            let n: i64 = sqlx::query_scalar(count_waiters)
                .fetch_one(admin)
                .await
                .expect("pg_stat_activity");
            if n > 0 {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        false
    }

    /// Locks a refresh token's row in `tx` until it ends, as another session would.
    async fn hold_refresh_row(tx: &mut sqlx::PgConnection, schema: &PgSchema, refresh: &str) {
        sqlx::query(&format!(
            "SELECT 1 FROM \"{}\".refresh_tokens WHERE digest = $1 FOR UPDATE",
            schema.name
        ))
        .bind(store::Digest::of(refresh).as_bytes().as_slice())
        .execute(tx)
        .await
        .expect("hold a refresh token's row");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_keeps_digests_only() {
        let schema = PgSchema::new();
        let store = schema.store().await;
        let admin = schema.admin().await;
        let name = schema.name.clone();
        testing::no_token_at_rest(store, || async move {
            let mut dump = Vec::new();
            for table in ["access_tokens", "refresh_tokens"] {
                let sql = format!("SELECT t::text FROM \"{name}\".{table} t");
                let rows: Vec<String> = sqlx::query_scalar(&sql)
                    .fetch_all(&admin)
                    .await
                    .expect("dump");
                for row in rows {
                    dump.extend(row.into_bytes());
                    dump.push(b'\n');
                }
            }
            dump
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_holds_the_client_registry() {
        let schema = PgSchema::new();
        testing::registry_contract(Arc::new(schema.sql_store(schema.config()).await)).await;
    }

    /// Two stores on one database (two gateway replicas): a token issued through one rotates
    /// through the other, and 2 x 50 concurrent rotations give exactly one winner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_replicas_share_one_rotation() {
        let schema = PgSchema::new();
        let (a, b) = (schema.store().await, schema.store().await);
        let now = store::now();
        let pair = testing::issue_pair(&a, testing::CLIENT, now).await;
        let mut tasks = Vec::new();
        for i in 0..100 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let refresh = pair.refresh.clone();
            tasks.push(tokio::spawn(async move {
                let (issue, _) =
                    testing::successor(&*store, testing::grant(testing::CLIENT), now, None);
                store
                    .rotate(&store::Digest::of(&refresh), testing::CLIENT, now, &|_| {
                        store::RotateDecision::Rotate(issue.clone())
                    })
                    .await
                    .expect("rotate")
            }));
        }
        let mut rotated = 0;
        for t in tasks {
            match t.await.expect("task") {
                store::RotateOutcome::Rotated { .. } => rotated += 1,
                store::RotateOutcome::AlreadyRotated { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(rotated, 1);
        assert_eq!(b.count_live(now).await.expect("count"), 3);
    }

    /// A rotation on PostgreSQL reads the token, decides, then consumes it and writes the
    /// successor in one statement. Whatever another replica does to the token in between
    /// (rotates it, revokes it, or is revoking it when the statement starts, which then waits
    /// for the row and checks it again), that statement writes nothing, not even the end of
    /// the predecessor's replay, and the outcome says why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_a_token_changed_while_the_rotation_decides_is_left_to_the_change() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use store::{Digest, RotateDecision, RotateOutcome};

        #[derive(Clone, Copy, Debug, PartialEq)]
        enum Meanwhile {
            Rotated,
            Revoked,
            RevokingUntilTheStatementWaits,
        }

        let schema = PgSchema::new();
        let (a, b) = (schema.store().await, schema.store().await);
        let admin = schema.admin().await;
        let revoke_row = format!(
            "UPDATE \"{}\".refresh_tokens SET revoked = TRUE WHERE digest = $1",
            schema.name
        );
        let now = store::now();
        let live_access = |store: SharedStore, access: String| async move {
            store
                .access_token(&Digest::of(&access), now)
                .await
                .expect("access_token")
                .is_some()
        };
        for meanwhile in [
            Meanwhile::Rotated,
            Meanwhile::Revoked,
            Meanwhile::RevokingUntilTheStatementWaits,
        ] {
            // Generation 1 is the token presented below.
            let (first, pair, replay) = family_with_a_replay(&a, now).await;
            let presented = Digest::of(&pair.refresh);
            let (mine, my_pair) =
                testing::successor(&*a, testing::grant(testing::CLIENT), now, None);
            let (theirs, their_pair) =
                testing::successor(&*a, testing::grant(testing::CLIENT), now, None);

            let changed = AtomicBool::new(false);
            let decide = |_: &store::RefreshToken| {
                let (b, admin, theirs) = (b.clone(), admin.clone(), theirs.clone());
                let revoke_row = revoke_row.clone();
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(async move {
                        match meanwhile {
                            Meanwhile::Rotated => {
                                let outcome = b
                                    .rotate(
                                        &presented,
                                        testing::CLIENT,
                                        now,
                                        &testing::rotate_to(theirs),
                                    )
                                    .await
                                    .expect("rotate");
                                assert!(matches!(outcome, RotateOutcome::Rotated { .. }));
                            }
                            Meanwhile::Revoked => {
                                assert!(b.revoke_token(&presented).await.expect("revoke"));
                            }
                            Meanwhile::RevokingUntilTheStatementWaits => {
                                // The row stays locked, revoked but not committed, until after
                                // the statement has started: it must wait, then see the commit.
                                let mut tx = admin.begin().await.expect("begin");
                                sqlx::query(&revoke_row)
                                    .bind(presented.as_bytes().as_slice())
                                    .execute(&mut *tx)
                                    .await
                                    .expect("revoke the row");
                                tokio::spawn(async move {
                                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                                    tx.commit().await.expect("commit");
                                });
                            }
                        }
                    })
                });
                changed.store(true, Ordering::SeqCst);
                RotateDecision::Rotate(mine.clone())
            };
            let outcome = a
                .rotate(&presented, testing::CLIENT, now, &decide)
                .await
                .expect("rotate");
            assert!(changed.load(Ordering::SeqCst), "the decision ran");
            assert!(
                !live_access(a.clone(), my_pair.access.clone()).await,
                "{meanwhile:?}"
            );
            let first_again = a
                .rotate(&Digest::of(&first.refresh), testing::CLIENT, now, &|_| {
                    RotateDecision::Reject
                })
                .await
                .expect("present generation 0");
            if meanwhile == Meanwhile::Rotated {
                assert_eq!(
                    outcome,
                    RotateOutcome::AlreadyRotated {
                        family: first.family,
                        replay: None
                    }
                );
                assert!(live_access(a.clone(), their_pair.access.clone()).await);
                // The first access token, generation 1's and the other replica's pair.
                assert_eq!(a.count_live(now).await.expect("count"), 4);
                // The other replica's rotation of generation 1 ended generation 0's replay.
                assert_eq!(
                    first_again,
                    RotateOutcome::AlreadyRotated {
                        family: first.family,
                        replay: None
                    }
                );
            } else {
                assert_eq!(outcome, RotateOutcome::Invalid, "{meanwhile:?}");
                // The two access tokens; generation 1, revoked, is not live.
                assert_eq!(a.count_live(now).await.expect("count"), 2, "{meanwhile:?}");
                // Nothing rotated generation 1: generation 0 still has its replay.
                assert_eq!(
                    first_again,
                    RotateOutcome::AlreadyRotated {
                        family: first.family,
                        replay: Some(replay)
                    },
                    "{meanwhile:?}"
                );
            }
            a.revoke_family(first.family).await.expect("revoke family");
        }
    }

    /// A rotation takes the presented generation's row, then its predecessor's (the end of
    /// the predecessor's replay, in the same statement). A family revocation (reuse detected)
    /// takes the family's refresh rows in that order too, newest first: taken in scan order,
    /// oldest first, it held the predecessor while it waited for the presented row, and
    /// PostgreSQL aborted one of the two as a deadlock (40P01, answered 503). The rotation is
    /// played here by hand, one lock at a time and waiting for each (as `ROTATE_POSTGRES` did
    /// before it skipped a held predecessor), so that the revocation starts between them. With
    /// the skip the old order would no longer deadlock but would leave the replay uncleared;
    /// this order keeps the rotation whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_a_family_revocation_takes_rows_in_the_rotations_order() {
        use store::Digest;

        let schema = PgSchema::new();
        let (a, b) = (schema.store().await, schema.store().await);
        let admin = schema.admin().await;
        let now = store::now();
        // Generation 0 keeps a replay; generation 1 is live.
        let (first, pair, _) = family_with_a_replay(&a, now).await;

        // The rotation of generation 1, first lock: its own row.
        let table = format!("\"{}\".refresh_tokens", schema.name);
        let mut rotation = admin.begin().await.expect("begin");
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *rotation)
            .await
            .expect("lock_timeout");
        let consumed = sqlx::query(&format!(
            "UPDATE {table} SET consumed_at = $2 WHERE digest = $1 AND consumed_at IS NULL"
        ))
        .bind(Digest::of(&pair.refresh).as_bytes().as_slice())
        .bind(now)
        .execute(&mut *rotation)
        .await
        .expect("consume generation 1")
        .rows_affected();
        assert_eq!(consumed, 1);

        // The revocation starts and waits for generation 1's row.
        let revocation = tokio::spawn(async move { b.revoke_family(first.family).await });
        // A backend of this schema's table (not another test's) waiting for a lock.
        let waiting = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE '%revoked = TRUE%' AND pid IN \
             (SELECT pid FROM pg_locks WHERE relation = '{table}'::regclass)"
        );
        assert!(
            a_backend_waits(&admin, &waiting).await,
            "the revocation never waited for the rotation's row"
        );

        // Second lock: the predecessor's replay ends. The revocation must not hold that row.
        let cleared = sqlx::query(&format!(
            "UPDATE {table} SET replay = NULL, replay_until = NULL \
             WHERE family = $1 AND generation < 1 AND replay IS NOT NULL"
        ))
        .bind(first.family.0.to_be_bytes().as_slice())
        .execute(&mut *rotation)
        .await
        .expect("the rotation takes its predecessor's row (deadlock or lock timeout: the revocation holds it)")
        .rows_affected();
        assert_eq!(cleared, 1);
        rotation.commit().await.expect("commit the rotation");

        let revoked = revocation
            .await
            .expect("revocation task")
            .expect("the revocation completes after the rotation, without a deadlock");
        // The two access tokens were live; generation 1 was consumed by the rotation.
        assert_eq!(revoked, Some(2));
        assert_eq!(a.count_live(now).await.expect("count"), 0);
        a.revoke_family(first.family).await.expect("revoke again");
    }

    /// A rotation waits for no row but the presented one: when another transaction holds its
    /// predecessor's row (in the gateway, a family revocation or a purge), the rotation leaves
    /// that replay's end to the holder instead of waiting, so it closes no lock cycle. Here the
    /// holder rolls back, so the replay it skipped is still there (until its `until`, or the
    /// family's next rotation).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_a_rotation_does_not_wait_for_its_predecessors_row() {
        use store::{Digest, RotateDecision, RotateOutcome};

        let schema = PgSchema::new();
        let a = schema.store().await;
        let admin = schema.admin().await;
        let now = store::now();
        let (first, pair, replay) = family_with_a_replay(&a, now).await;

        let mut holder = admin.begin().await.expect("begin");
        hold_refresh_row(&mut holder, &schema, &first.refresh).await;
        let (gen2, _) = testing::successor(&*a, testing::grant(testing::CLIENT), now, None);
        let outcome = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            a.rotate(&Digest::of(&pair.refresh), testing::CLIENT, now, &|_| {
                RotateDecision::Rotate(gen2.clone())
            }),
        )
        .await
        .expect("the rotation waited for its predecessor's row")
        .expect("rotate");
        assert!(matches!(outcome, RotateOutcome::Rotated { .. }));
        holder.rollback().await.expect("rollback");

        let first_again = a
            .rotate(&Digest::of(&first.refresh), testing::CLIENT, now, &|_| {
                RotateDecision::Reject
            })
            .await
            .expect("present generation 0");
        assert_eq!(
            first_again,
            RotateOutcome::AlreadyRotated {
                family: first.family,
                replay: Some(replay)
            }
        );
    }

    /// Two revocations of one family run one after the other: each first takes the family's
    /// advisory lock, before any row, so the second waits holding nothing. (At once, each
    /// takes rows newer than those it holds in its next pass, and the two could deadlock.)
    /// Here another session holds that lock: the revocation must wait for it without holding
    /// any of the family's rows, then revoke the family.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_revocations_of_one_family_take_turns() {
        let schema = PgSchema::new();
        let (a, b) = (schema.store().await, schema.store().await);
        let admin = schema.admin().await;
        let now = store::now();
        let pair = testing::issue_pair(&a, testing::CLIENT, now).await;
        // The lock's key: the family's first eight bytes (big-endian), as the store takes it.
        let key = (pair.family.0 >> 64) as u64 as i64;

        let mut other = admin.begin().await.expect("begin");
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key)
            .execute(&mut *other)
            .await
            .expect("take the family's revocation lock");
        let family = pair.family;
        let revocation = tokio::spawn(async move { b.revoke_family(family).await });
        let waiting = "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' \
             AND query LIKE '%pg_advisory_xact_lock%' AND pid <> pg_backend_pid()";
        assert!(
            a_backend_waits(&admin, waiting).await,
            "the revocation did not wait for the family's lock"
        );
        // Meanwhile it holds none of the family's rows.
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *other)
            .await
            .expect("lock_timeout");
        for table in ["access_tokens", "refresh_tokens"] {
            let n = sqlx::query(&format!(
                "SELECT 1 FROM \"{}\".{table} WHERE family = $1 FOR UPDATE",
                schema.name
            ))
            .bind(pair.family.0.to_be_bytes().as_slice())
            .execute(&mut *other)
            .await
            .expect("the family's rows are free while the revocation waits")
            .rows_affected();
            assert_eq!(n, 1, "{table}");
        }
        assert!(!revocation.is_finished());
        other.commit().await.expect("commit");

        let revoked = revocation
            .await
            .expect("revocation task")
            .expect("revoke_family");
        assert_eq!(revoked, Some(2));
        assert_eq!(a.count_live(now).await.expect("count"), 0);
    }

    /// A purge waits for no row: one that another transaction holds is left to a later purge.
    /// Its scan takes a family's expired rows oldest first, a revocation newest first; waiting,
    /// the two could deadlock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_a_purge_does_not_wait_for_a_held_row() {
        let schema = PgSchema::new();
        let a = schema.store().await;
        let admin = schema.admin().await;
        let now = store::now();
        let held = testing::issue_pair(&a, testing::CLIENT, now).await;
        testing::issue_pair(&a, testing::CLIENT, now).await;

        let mut holder = admin.begin().await.expect("begin");
        hold_refresh_row(&mut holder, &schema, &held.refresh).await;
        let later = now + testing::REFRESH_TTL + 1;
        let removed =
            tokio::time::timeout(std::time::Duration::from_secs(10), a.purge_expired(later))
                .await
                .expect("the purge waited for a held row")
                .expect("purge");
        // Both access tokens and the refresh token nobody holds.
        assert_eq!(removed, 3);
        holder.rollback().await.expect("rollback");
        assert_eq!(a.purge_expired(later).await.expect("purge"), 1);
    }

    /// F2: the server drops every connection of the pool; the next calls reconnect by
    /// themselves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_pool_recovers_after_connections_are_killed() {
        let schema = PgSchema::new();
        let app = schema.name.clone();
        let mut config = schema.config();
        let sep = if config.url.contains('?') { '&' } else { '?' };
        config.url = format!("{}{sep}application_name={app}", config.url);
        let store: SharedStore = Arc::new(schema.sql_store(config).await);
        let now = store::now();
        let pair = testing::issue_pair(&store, testing::CLIENT, now).await;

        let admin = schema.admin().await;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&app)
        .fetch_all(&admin)
        .await
        .expect("terminate");
        assert!(!killed.is_empty(), "the store had connections to kill");

        store
            .ping()
            .await
            .expect("ping after the connections were killed");
        assert!(
            store
                .access_token(&store::Digest::of(&pair.access), now)
                .await
                .expect("lookup after reconnect")
                .is_some()
        );
        testing::issue_pair(&store, testing::CLIENT, now).await;
    }
}
