//! Bounded `client` label values.
//!
//! Only client ids registered with [`crate::Monitoring::set_known_clients`] ever become a label
//! value; every other value (an unknown id, a mistyped id, a token someone put in the client
//! attribute) is counted as `other`, and a missing client as `anonymous`. Ids get a stable slot
//! the first time they are registered and keep it for the life of the registry, and there are at
//! most `max_client_labels` such slots: this is the hard cap on client series, because a series
//! once exported stays in the registry.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use arc_swap::cache::Cache;

/// Label value for a request without a client identity.
pub const ANONYMOUS: &str = "anonymous";
/// Label value for every client id that is not registered (or beyond the cap).
pub const OTHER: &str = "other";
/// Default hard cap on distinct registered client label values.
pub const DEFAULT_MAX_CLIENT_LABELS: usize = 1000;
/// Longer ids are never used as labels (registry ids are short; a long value is suspicious).
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// A resolved `client` label: a small index, `Copy`, resolved once per request with
/// [`crate::Monitoring::client`] and then passed to every service or composite recorded for
/// that request. Only meaningful for the [`crate::Monitoring`] that produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientLabel(u32);

impl ClientLabel {
    /// No client identity on the request.
    pub const ANONYMOUS: ClientLabel = ClientLabel(0);
    /// A client id that is not registered (or registered beyond the cap).
    pub const OTHER: ClientLabel = ClientLabel(1);

    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

const FIRST_KNOWN: usize = 2;

/// A multiply-rotate hasher (FxHash) for the registered-id map, read on every request. Flooding
/// is not a concern: the map's keys are the operator's registered ids, so a request value can
/// only probe existing chains, never lengthen them.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Whole words straight from the slice; only the tail is copied into a padded word.
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.write_u64(u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        let tail = words.remainder();
        if !tail.is_empty() {
            let mut word = [0u8; 8];
            word[..tail.len()].copy_from_slice(tail);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by ids or names that come from configuration.
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

type KnownIds = FastMap<Box<str>, ClientLabel>;

pub(crate) struct Clients {
    /// Tells this set from every other in the threads' caches ([`Clients::resolve`]).
    id: u64,
    cap: usize,
    /// Ids currently registered: read on every resolution, replaced when they change.
    known: Arc<ArcSwap<KnownIds>>,
    /// Every id that ever got a slot; append-only so slots stay stable across reloads.
    interned: Mutex<Interner>,
}

#[derive(Default)]
struct Interner {
    by_id: HashMap<Arc<str>, ClientLabel>,
    names: Vec<Arc<str>>,
}

impl Clients {
    pub(crate) fn new(cap: usize) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Clients {
            id: NEXT_ID.fetch_add(1, Relaxed),
            cap,
            known: Arc::new(ArcSwap::from_pointee(KnownIds::default())),
            interned: Mutex::new(Interner::default()),
        }
    }

    /// Number of label slots a usage handle needs: anonymous, other, and the cap.
    pub(crate) fn slot_count(&self) -> usize {
        self.cap + FIRST_KNOWN
    }

    /// Once per request. The registered ids are read through this thread's cached handle on
    /// them: a pointer compared with the shared one, where an `ArcSwap::load` takes and pays back
    /// a debt slot (about 80 instructions, two of them locked) on every request. The cache holds
    /// one set of ids per thread (a process has one [`crate::Monitoring`]; a thread that
    /// resolves for another loads afresh).
    pub(crate) fn resolve(&self, id: Option<&str>) -> ClientLabel {
        type Cached = (u64, Cache<Arc<ArcSwap<KnownIds>>, Arc<KnownIds>>);
        thread_local! {
            static CACHED: RefCell<Option<Cached>> = const { RefCell::new(None) };
        }
        match id {
            // The engine may pass the label value itself for a request without a client.
            None | Some("") | Some(ANONYMOUS) => ClientLabel::ANONYMOUS,
            Some(id) => CACHED.with_borrow_mut(|cached| {
                let (_, cache) = match cached {
                    Some(c) if c.0 == self.id => c,
                    _ => cached.insert((self.id, Cache::new(self.known.clone()))),
                };
                cache.load().get(id).copied().unwrap_or(ClientLabel::OTHER)
            }),
        }
    }

    /// The label value of a slot (cold path: called once per handle and client).
    pub(crate) fn label_value(&self, label: ClientLabel) -> Arc<str> {
        match label.index() {
            0 => Arc::from(ANONYMOUS),
            1 => Arc::from(OTHER),
            i => {
                let interner = self.interned.lock().unwrap_or_else(|e| e.into_inner());
                interner
                    .names
                    .get(i - FIRST_KNOWN)
                    .cloned()
                    .unwrap_or_else(|| Arc::from(OTHER))
            }
        }
    }

    /// Replaces the set of registered ids; returns how many of them got a label of their own.
    pub(crate) fn set_known<S: AsRef<str>>(&self, ids: &[S]) -> usize {
        let mut interner = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        let mut known =
            KnownIds::with_capacity_and_hasher(ids.len().min(self.cap), Default::default());
        let mut refused = 0usize;
        for id in ids {
            let id = id.as_ref();
            if id.is_empty() || id.len() > MAX_CLIENT_ID_LEN {
                refused += 1;
                continue;
            }
            let label = match interner.by_id.get(id) {
                Some(label) => *label,
                None if interner.names.len() < self.cap => {
                    let label = ClientLabel((interner.names.len() + FIRST_KNOWN) as u32);
                    let id: Arc<str> = Arc::from(id);
                    interner.names.push(id.clone());
                    interner.by_id.insert(id, label);
                    label
                }
                None => {
                    refused += 1;
                    continue;
                }
            };
            known.insert(Box::from(id), label);
        }
        if refused > 0 {
            tracing::warn!(
                refused,
                cap = self.cap,
                "some client ids are counted as \"other\": empty, too long, or beyond the client label cap"
            );
        }
        let labelled = known.len();
        // The registry is read every few seconds and seldom changes: an unchanged set keeps
        // its map, so the threads' cached handles stay valid.
        if **self.known.load() != known {
            self.known.store(Arc::new(known));
        }
        labelled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_clients() {
        let clients = Clients::new(3);
        clients.set_known(&["app-1", "app-2"]);
        assert_eq!(clients.resolve(None), ClientLabel::ANONYMOUS);
        assert_eq!(clients.resolve(Some("")), ClientLabel::ANONYMOUS);
        assert_eq!(clients.resolve(Some("anonymous")), ClientLabel::ANONYMOUS);
        assert_eq!(clients.resolve(Some("nope")), ClientLabel::OTHER);
        let a = clients.resolve(Some("app-1"));
        assert_eq!(&*clients.label_value(a), "app-1");
    }

    #[test]
    fn slots_are_stable_across_reloads_and_capped() {
        let clients = Clients::new(3);
        clients.set_known(&["a", "b"]);
        let a = clients.resolve(Some("a"));
        // "a" removed: counted as other; re-added: same slot.
        clients.set_known(&["b", "c"]);
        assert_eq!(clients.resolve(Some("a")), ClientLabel::OTHER);
        assert_eq!(clients.set_known(&["a", "b", "c", "d"]), 3);
        assert_eq!(clients.resolve(Some("a")), a);
        // "d" would be the fourth slot: beyond the cap.
        assert_eq!(clients.resolve(Some("d")), ClientLabel::OTHER);
    }

    #[test]
    fn a_thread_resolving_for_two_sets_and_after_changes_reads_each_sets_current_ids() {
        let first = Clients::new(3);
        let second = Clients::new(3);
        first.set_known(&["a"]);
        second.set_known(&["b"]);
        for _ in 0..2 {
            assert_ne!(first.resolve(Some("a")), ClientLabel::OTHER);
            assert_eq!(first.resolve(Some("b")), ClientLabel::OTHER);
            assert_ne!(second.resolve(Some("b")), ClientLabel::OTHER);
            assert_eq!(second.resolve(Some("a")), ClientLabel::OTHER);
        }
        // A change is seen at once by a thread that has the old set cached.
        first.set_known(&["b"]);
        assert_eq!(first.resolve(Some("a")), ClientLabel::OTHER);
        assert_ne!(first.resolve(Some("b")), ClientLabel::OTHER);
        // And by another thread.
        std::thread::scope(|s| {
            s.spawn(|| assert_ne!(first.resolve(Some("b")), ClientLabel::OTHER));
        });
        // The same set again keeps its map.
        let before = Arc::as_ptr(&first.known.load_full());
        first.set_known(&["b"]);
        assert_eq!(Arc::as_ptr(&first.known.load_full()), before);
    }

    #[test]
    fn ids_of_every_tail_length_hash_apart_and_resolve() {
        use std::hash::BuildHasher;
        // Ids of 1 to 40 bytes, differing in one byte at every position of the tail.
        let mut ids = Vec::new();
        for len in 1..=40usize {
            for at in 0..len {
                let mut id = vec![b'a'; len];
                id[at] = b'b';
                ids.push(String::from_utf8(id).unwrap());
            }
            ids.push("a".repeat(len));
        }
        let build = BuildHasherDefault::<IdHasher>::default();
        let mut hashes: Vec<u64> = ids.iter().map(|id| build.hash_one(id.as_str())).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), ids.len(), "no two of these ids hash alike");

        let clients = Clients::new(ids.len());
        assert_eq!(clients.set_known(&ids), ids.len());
        let labels: std::collections::HashSet<ClientLabel> =
            ids.iter().map(|id| clients.resolve(Some(id))).collect();
        assert_eq!(labels.len(), ids.len());
        assert!(!labels.contains(&ClientLabel::OTHER));
    }

    #[test]
    fn long_ids_are_never_labels() {
        let clients = Clients::new(10);
        let long = "x".repeat(MAX_CLIENT_ID_LEN + 1);
        assert_eq!(clients.set_known(&[long.as_str()]), 0);
        assert_eq!(clients.resolve(Some(&long)), ClientLabel::OTHER);
    }
}
