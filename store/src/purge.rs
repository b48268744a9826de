//! The purge task: removes expired tokens on the configured interval (the seeds' "purge
//! expired tokens every", 60 s by default), and in the memory store the tokens of revoked
//! families ([`crate::memory`]).
//!
//! Expired and revoked tokens are refused by every lookup whether or not the purge has run;
//! the purge only gives the space back. A failing purge (store down) logs a warning and tries
//! again at the next tick: it never ends the task.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::SharedStore;

/// Spawns the purge loop on the current Tokio runtime. The first purge runs one `interval`
/// after the call. `on_purged` receives the number of entries each successful purge removed
/// (zero included), e.g. to feed a counter. Abort the returned handle to stop the task.
pub fn spawn(
    store: SharedStore,
    interval: Duration,
    on_purged: impl Fn(u64) + Send + Sync + 'static,
) -> JoinHandle<()> {
    // tokio panics on a zero period; a zero interval in config means "as often as sensible".
    let period = interval.max(Duration::from_millis(1));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // After a long stall (store timeouts) one purge catches up; a burst would not help.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match store.purge_expired(crate::now()).await {
                Ok(removed) => {
                    if removed > 0 {
                        tracing::info!(
                            store = store.kind(),
                            removed,
                            "purged expired and revoked tokens"
                        );
                    } else {
                        tracing::debug!(store = store.kind(), "purge found nothing to remove");
                    }
                    on_purged(removed);
                }
                Err(e) => {
                    tracing::warn!(store = store.kind(), error = %e, "purge of expired tokens failed; retrying at the next interval");
                }
            }
        }
    })
}
