//! The purge task: runs on its interval, reports what it removed, survives store errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use store::config::SqlConfig;
use store::sql::SqlStore;
use store::*;

/// Fails the first `failures` purges, then delegates.
struct Flaky {
    inner: SharedStore,
    failures: AtomicU32,
}

#[async_trait]
impl TokenStore for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    async fn issue(&self, issue: Issue) -> StoreResult<()> {
        self.inner.issue(issue).await
    }
    async fn access_token(&self, d: &Digest, now: UnixTime) -> StoreResult<Option<AccessToken>> {
        self.inner.access_token(d, now).await
    }
    async fn rotate(
        &self,
        p: &Digest,
        c: &str,
        now: UnixTime,
        decide: &Decide<'_>,
    ) -> StoreResult<RotateOutcome> {
        self.inner.rotate(p, c, now, decide).await
    }
    async fn revoke_token(&self, d: &Digest) -> StoreResult<bool> {
        self.inner.revoke_token(d).await
    }
    async fn revoke_family(&self, f: FamilyId) -> StoreResult<Option<u64>> {
        self.inner.revoke_family(f).await
    }
    async fn purge_expired(&self, now: UnixTime) -> StoreResult<u64> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        self.inner.purge_expired(now).await
    }
    async fn count_live(&self, now: UnixTime) -> StoreResult<u64> {
        self.inner.count_live(now).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
}

#[tokio::test]
async fn purge_task_reports_removals_and_survives_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let sql: SharedStore = Arc::new(
        SqlStore::connect(&SqlConfig::new(url))
            .await
            .expect("store"),
    );
    let now = store::now();
    // Already expired: the purge must take both tokens; the live pair stays.
    let (issue, _) = testing::new_issue(&*sql, testing::grant(testing::CLIENT), now - 100, 10, 20);
    sql.issue(issue).await.expect("issue");
    testing::issue_pair(&sql, testing::CLIENT, now).await;

    let store: SharedStore = Arc::new(Flaky {
        inner: sql.clone(),
        failures: AtomicU32::new(2),
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = store::purge::spawn(store.clone(), Duration::from_millis(20), move |n| {
        let _ = tx.send(n);
    });
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a purge succeeded after the injected failures")
        .expect("channel open");
    assert_eq!(first, 2, "the expired access and refresh tokens");
    let second = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the task keeps running")
        .expect("channel open");
    assert_eq!(second, 0);
    assert!(!task.is_finished());
    task.abort();
    assert_eq!(sql.count_live(now).await.expect("count"), 2);
}

#[tokio::test(start_paused = true)]
async fn first_purge_waits_one_interval() {
    let store: SharedStore = Arc::new(store::memory::MemoryStore::new(10));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = store::purge::spawn(store, Duration::from_secs(60), move |n| {
        let _ = tx.send(n);
    });
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert!(rx.try_recv().is_err(), "no purge before the first interval");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.recv().await, Some(0));
    task.abort();
}
