//! Store-level references, run without HTTP in a process of their own:
//!
//! - `rotate_loop`: the refresh grant's store work alone (`SqlStore::connect` +
//!   `TokenStore::rotate` with a decision that mints a successor pair, as the filter's does),
//!   `tasks` chains at once on a runtime with the same worker count as the gateway. This is the
//!   denominator of the `refresh-sqlite >= 0.75x` target.
//! - `rotations_at_cap`: the memory store's rotations alone, below its `max_tokens` and once
//!   full (every write then evicts), to time what eviction adds.
//! - `memory_per_token`: RSS delta per entry for N entries in the `MemoryStore`, in a plain
//!   `std::collections::HashMap<[u8; 32], _>` holding the same fields (the baseline), or in a
//!   moka cache at its leanest (no expiry, no listener, no bound; the floor of a moka store).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use store::{
    Digest, FamilyId, Grant, Issue, NewToken, RefreshToken, RotateDecision, RotateOutcome,
    TokenStore,
};

use crate::procfs;

/// A new token's digest as `store` keeps it: random, and carrying the place the store gives,
/// if any, as the digest of a token minted with that place would.
fn random_digest(store: &dyn TokenStore) -> Digest {
    let mut digest = Digest(rand::random());
    if let Some(place) = store.token_place() {
        place.mark(&mut digest);
    }
    digest
}

fn grant(client_id: &str) -> Arc<Grant> {
    Arc::new(Grant {
        client_id: client_id.to_owned(),
        subject: None,
        scope: "read".to_owned(),
        metadata: BTreeMap::new(),
    })
}

fn new_issue(
    store: &dyn TokenStore,
    grant: Arc<Grant>,
    family: FamilyId,
    generation: u32,
    now: i64,
) -> Issue {
    let digests = [random_digest(store), random_digest(store)];
    issue_of(grant, family, generation, now, digests)
}

/// An issue of the refresh grant's lifetimes (3600 s, 43200 s) under these digests: a rotation's
/// decision, which must mint the same tokens however many times the store asks it.
fn issue_of(
    grant: Arc<Grant>,
    family: FamilyId,
    generation: u32,
    now: i64,
    [access, refresh]: [Digest; 2],
) -> Issue {
    Issue {
        grant,
        family,
        generation,
        issued_at: now,
        access: NewToken {
            digest: access,
            expires_at: now + 3600,
        },
        refresh: Some(NewToken {
            digest: refresh,
            expires_at: now + 43200,
        }),
        access_grant: None,
        replay: None,
    }
}

/// The figures of a store-only rotation run (the measured window only).
pub struct RotateRun {
    pub rotations: u64,
    pub failures: u64,
    pub elapsed_secs: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Rotates `tasks` refresh chains in `store` back to back for `warmup + duration`; `on_phase`
/// is called as the measured window opens ("START") and closes ("STOP").
pub async fn rotate_loop(
    store: Arc<dyn TokenStore>,
    tasks: usize,
    warmup: Duration,
    duration: Duration,
    on_phase: impl Fn(&str),
) -> anyhow::Result<RotateRun> {
    const CLIENT: &str = "bench-client";
    let phase = Arc::new(AtomicU8::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let store = store.clone();
        let phase = phase.clone();
        let failures = failures.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 14);
            let now = store::now();
            let first = new_issue(&*store, grant(CLIENT), FamilyId::random(), 0, now);
            let mut presented = first.refresh.expect("refresh").digest;
            store.issue(first).await?;
            while phase.load(Ordering::Relaxed) != 2 {
                let now = store::now();
                let (access, refresh) = (random_digest(&*store), random_digest(&*store));
                let decide = |old: &RefreshToken| {
                    let grant = Arc::new(Grant::clone(&old.grant));
                    let next = old.generation + 1;
                    RotateDecision::Rotate(issue_of(
                        grant,
                        old.family,
                        next,
                        now,
                        [access, refresh],
                    ))
                };
                let started = phase.load(Ordering::Relaxed);
                let t0 = Instant::now();
                let outcome = store.rotate(&presented, CLIENT, now, &decide).await;
                let dt = t0.elapsed();
                match outcome {
                    Ok(RotateOutcome::Rotated { .. }) => {
                        presented = refresh;
                        if started == 1 && phase.load(Ordering::Relaxed) == 1 {
                            lat.push(dt.as_nanos() as u64);
                        }
                    }
                    other => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        anyhow::bail!("rotation failed: {other:?}");
                    }
                }
            }
            anyhow::Ok(lat)
        }));
    }
    tokio::time::sleep(warmup).await;
    phase.store(1, Ordering::SeqCst);
    let start = Instant::now();
    on_phase("START");
    tokio::time::sleep(duration).await;
    phase.store(2, Ordering::SeqCst);
    let elapsed = start.elapsed();
    on_phase("STOP");
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await??);
    }
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1] as f64 / 1000.0
        }
    };
    Ok(RotateRun {
        rotations: all.len() as u64,
        failures: failures.load(Ordering::Relaxed),
        elapsed_secs: elapsed.as_secs_f64(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}

/// What [`rotations_at_cap`] measures, phase by phase (filling to half, to full, full, full
/// again).
pub struct AtCap {
    /// Nanoseconds per rotation.
    pub ns: [f64; 4],
    /// The rotations' tail once full: p99.9 and max, ns.
    pub tail_ns: [f64; 2],
    pub evictions: u64,
    /// The process's resident memory after each phase, kB.
    pub rss_kb: [u64; 4],
}

/// Nanoseconds per rotation of the memory store (no HTTP, the calling thread only) in the
/// phases of one run: filling up to half of `max_tokens`, reaching it, then twice once full.
/// 64 chains rotate in turn; issue times advance one second per `max_tokens / 200` rotations
/// (5,000 at a million), so that a full store spans 100 s of issues, as it would at a few
/// thousand grants per second. A store that turns over within one second ties every rank on
/// its issue second, and its evictions then take any of its entries, the chains' newest too;
/// so does a store of a few entries per shard (at 2,000 tokens, 8 per shard), where a shard's
/// oldest may be seconds old while older tokens sit in other shards: the run then stops at the
/// rotation that finds its chain's token evicted (as at f495ccd, before the reserve).
pub fn rotations_at_cap(max_tokens: u64) -> anyhow::Result<AtCap> {
    use store::ImmediateStore;
    const CHAINS: usize = 64;
    let store = store::memory::MemoryStore::new(max_tokens);
    let t0 = store::now();
    let mut heads = Vec::with_capacity(CHAINS);
    for _ in 0..CHAINS {
        let issue = new_issue(&store, grant("bench-client"), FamilyId::random(), 0, t0);
        heads.push(issue.refresh.expect("refresh").digest);
        store.issue_now(issue)?;
    }
    let per_second = (max_tokens / 200).max(1);
    let mut done = 0usize;
    // Each rotation's time once full: the ones that make a pass over a shard are the tail.
    // Written in place into a record whose pages are all touched before the first phase, so
    // that the resident memory after each phase does not grow with the record.
    let full_count = (max_tokens as usize / 4) * 4;
    let mut full_ns: Vec<u64> = vec![u64::MAX; full_count];
    let mut recorded = 0;
    let mut rotate = |count: u64, full: bool| -> anyhow::Result<f64> {
        let started = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            let now = t0 + (done as u64 / per_second) as i64;
            let chain = done % CHAINS;
            done += 1;
            let (access, refresh) = (random_digest(&store), random_digest(&store));
            let decide = |old: &RefreshToken| {
                let (grant, next) = (old.grant.clone(), old.generation + 1);
                RotateDecision::Rotate(issue_of(grant, old.family, next, now, [access, refresh]))
            };
            match store.rotate_now(&heads[chain], "bench-client", now, &decide)? {
                RotateOutcome::Rotated { .. } => heads[chain] = refresh,
                other => anyhow::bail!("rotation {done} failed: {other:?}"),
            }
            if full {
                full_ns[recorded] = t.elapsed().as_nanos() as u64;
                recorded += 1;
            }
        }
        Ok(started.elapsed().as_nanos() as f64 / count.max(1) as f64)
    };
    // Each rotation adds two entries (the new pair; the old refresh token stays as a tombstone).
    let half = max_tokens / 4;
    // The process's resident memory after each phase. A store at its bound holds as many
    // entries after the last phase as after the one before: what grows between the two is
    // memory held beyond the entries (tables rebuilt or doubled, the allocator's free space).
    let rss = || procfs::status_kb("self", "VmRSS").unwrap_or(0);
    let mut rss_kb = [0; 4];
    let mut phases = [0.0; 4];
    for (i, (count, full)) in [
        (half, false),
        (half, false),
        (2 * half, true),
        (2 * half, true),
    ]
    .into_iter()
    .enumerate()
    {
        phases[i] = rotate(count, full)?;
        rss_kb[i] = rss();
    }
    full_ns.truncate(recorded);
    full_ns.sort_unstable();
    let at = |q: f64| {
        let last = full_ns.len().saturating_sub(1);
        full_ns
            .get(((full_ns.len() as f64 * q) as usize).min(last))
            .map_or(0.0, |&ns| ns as f64)
    };
    Ok(AtCap {
        ns: phases,
        tail_ns: [at(0.999), at(1.0)],
        evictions: store.evictions(),
        rss_kb,
    })
}

/// The memory store's entry, field for field, in a plain HashMap: the baseline.
#[allow(dead_code)] // held only for its size
#[derive(Clone)]
struct BaselineEntry {
    grant: Arc<Grant>,
    tomb: Option<Arc<()>>,
    family: [u64; 2],
    issued_at: i64,
    expires_at: i64,
    generation: u32,
    kind: u8,
    state: u8,
}

/// The two entries of one issue (access, refresh), as the baselines hold them.
fn baseline_pair(g: &Arc<Grant>, now: i64) -> [BaselineEntry; 2] {
    let family = FamilyId::random().0;
    [now + 3600, now + 43200].map(|expires_at| BaselineEntry {
        grant: g.clone(),
        tomb: None,
        family: [(family >> 64) as u64, family as u64],
        issued_at: now,
        expires_at,
        generation: 0,
        kind: 0,
        state: 0,
    })
}

/// What a family revocation costs the memory store at the size measured: the revocation
/// itself (into the revoked set), and the purge pass that sweeps the revoked families, beside
/// the same pass with none pending. Medians of [`TIMED`] runs.
pub struct RevocationTimes {
    pub revoke_family_us: Option<f64>,
    pub purge_pass_ms: Option<f64>,
    pub purge_pass_sweeping_ms: Option<f64>,
}

const TIMED: usize = 5;

/// Memory per entry after writing `pairs` access+refresh pairs (2 entries each, one shared
/// `Arc<Grant>` per pair, as an issue writes them). Returns the entries, the RSS delta in
/// bytes and, for the memory store, what a family revocation costs at that size.
pub async fn memory_per_token(
    kind: &str,
    pairs: usize,
) -> anyhow::Result<(u64, u64, Option<RevocationTimes>)> {
    let client = "Xq3pL0aZ9bC8dE7fG6hI5j".to_owned();
    let before = procfs::status_kb("self", "VmRSS").unwrap_or(0);
    let now = store::now();
    let measured = match kind {
        "memory" => {
            let store = store::memory::MemoryStore::new((pairs * 2) as u64);
            for _ in 0..pairs {
                store
                    .issue(new_issue(
                        &store,
                        grant(&client),
                        FamilyId::random(),
                        0,
                        now,
                    ))
                    .await?;
            }
            let entries = store.entry_count();
            let after = procfs::status_kb("self", "VmRSS").unwrap_or(0);
            let (mut revokes, mut passes, mut sweeps) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..TIMED {
                let started = std::time::Instant::now();
                store.purge_expired(now).await?;
                passes.push(started.elapsed().as_secs_f64() * 1e3);
                // Families of no token held: a sweeping pass pays for one lookup in the revoked
                // set per entry, whatever it removes, and the store keeps its size for the next
                // round.
                for _ in 0..TIMED {
                    let started = std::time::Instant::now();
                    store.revoke_family(FamilyId::random()).await?;
                    revokes.push(started.elapsed().as_secs_f64() * 1e6);
                }
                let started = std::time::Instant::now();
                store.purge_expired(now).await?;
                sweeps.push(started.elapsed().as_secs_f64() * 1e3);
            }
            let times = RevocationTimes {
                revoke_family_us: crate::harness::median(revokes),
                purge_pass_ms: crate::harness::median(passes),
                purge_pass_sweeping_ms: crate::harness::median(sweeps),
            };
            return Ok((entries, after.saturating_sub(before) * 1024, Some(times)));
        }
        "hashmap" => {
            let mut map: HashMap<[u8; 32], BaselineEntry> = HashMap::new();
            for _ in 0..pairs {
                let g = grant(&client);
                for entry in baseline_pair(&g, now) {
                    map.insert(rand::random(), entry);
                }
            }
            let entries = map.len() as u64;
            let after = procfs::status_kb("self", "VmRSS").unwrap_or(0);
            drop(map);
            (entries, after.saturating_sub(before) * 1024, None)
        }
        "moka" => {
            let cache: moka::sync::Cache<Digest, BaselineEntry, store::DigestBuildHasher> =
                moka::sync::Cache::builder().build_with_hasher(Default::default());
            for _ in 0..pairs {
                let g = grant(&client);
                for entry in baseline_pair(&g, now) {
                    cache.insert(Digest(rand::random()), entry);
                }
            }
            cache.run_pending_tasks();
            let entries = cache.entry_count();
            let after = procfs::status_kb("self", "VmRSS").unwrap_or(0);
            drop(cache);
            (entries, after.saturating_sub(before) * 1024, None)
        }
        other => anyhow::bail!("unknown memory kind {other:?} (memory | hashmap | moka)"),
    };
    Ok(measured)
}
