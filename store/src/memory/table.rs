//! One shard's hash table, grown without a pause.
//!
//! A `HashMap` that is full doubles in one go: it allocates the new table and moves every entry
//! while its caller (here, a shard lock and the request behind it) waits. For a shard of 7,000
//! tokens that took 1.2 ms on this VM, most of it page faults on the fresh table.
//! [`Table`] grows the way Redis does instead: when `current` is full it becomes `retiring`, a
//! table with twice its capacity (or of its own, below) takes its place, and every later write
//! moves [`STEP`] entries across.
//! Lookups look in both. What the growth itself costs is the new table's allocation; its pages
//! are touched (and, fresh from the kernel, faulted in) a few per write instead of all at once.
//! Measured on the refresh grant at one worker, 64 connections, 5 s (inserts timed under the
//! shard lock): the longest insert went from 1.2 ms (a shard of 7,169 tokens doubling in one
//! go) to 0.27 ms, and the time spent in inserts over 20 µs from 110 ms to 23 ms.
//!
//! Positions: a [`HashTable`] (hashbrown's, with the hash given by the caller) whose hash is a
//! digest's first eight bytes. For a token with a place ([`crate::Place`]) their low bits are its
//! position, so the entry goes to that slot of the table, or to the first free one after it if a
//! live entry holds it; [`Table::insert`] says how many it skipped, and the store moves the
//! shard's next places on by as much. A moved entry lands at its place in the new table.
//!
//! That smooths one shard's growth. Across shards, the store gives them unequal shares of the
//! keys (`ShardMap`), so that they do not all grow during the same writes.
//!
//! A table that runs out of room is not always full: a removed entry may leave its slot marked
//! as removed (so that probes go on past it), and that slot counts against the room until the
//! table is rebuilt. A store at its bound removes as many entries as it writes, so its tables
//! run out of room again and again with the same number of entries. Such a table is rebuilt at
//! its own size, the same way (a new table, [`STEP`] entries moved per write), and doubles only
//! when its entries fill more than [`REBUILD_AT_MOST`] of it. Doubling on every exhaustion, as
//! it did before, took the tables of a store of 200,000 entries at its bound from room for
//! 300,000 to room for 555,000 over ten times its size in writes; with rebuilds, 407,000 (the
//! tables that double are the ones more than 3/4 full). `bench evict` (a million entries, two
//! rounds of writes at the bound): 220 to 221 MB resident after the second round, 212 to 216 MB
//! with rebuilds, at the same time per rotation.

use std::mem;

use hashbrown::HashTable;

use crate::Digest;

/// Entries moved from the retiring table per insert or `get_mut`: the retiring table is empty
/// after 1/16 as many writes as it held, so a shard holds both tables only briefly; the move
/// per write stays a few microseconds at most.
const STEP: usize = 16;

/// A table out of room is rebuilt at its size when its entries fill at most this share of it
/// (numerator, denominator), and doubles otherwise. At most 3/4, a rebuild leaves a quarter of
/// the table free: the next one is at least that many writes away, so a rebuild moves at most
/// three entries per write over that stretch, where a table rebuilt nearly full would rebuild
/// again after a few writes.
const REBUILD_AT_MOST: (usize, usize) = (3, 4);

type Map<V> = HashTable<(Digest, V)>;

/// A digest's hash ([`Digest::first_u64`]): uniform for a digest with no place, the place's
/// position in its low bits for one with a place ([`crate::Place`]), so that the table puts
/// the entry at that position, or the first free one after it.
fn hash(key: &Digest) -> u64 {
    key.first_u64()
}

fn rehash<V>(entry: &(Digest, V)) -> u64 {
    hash(&entry.0)
}

fn is<V>(key: &Digest) -> impl Fn(&(Digest, V)) -> bool + '_ {
    move |(k, _)| k == key
}

/// What [`Table::insert`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Inserted<V> {
    /// The key was there: its value, now replaced.
    Replaced(V),
    /// A new entry, written this many slots past the position its hash names (0: at it).
    New { skipped: usize },
}

#[cfg(test)]
impl<V> Inserted<V> {
    pub(super) fn replaced(self) -> Option<V> {
        match self {
            Inserted::Replaced(v) => Some(v),
            Inserted::New { .. } => None,
        }
    }
}

pub(super) struct Table<V> {
    current: Map<V>,
    /// What `current` holds with no removed slots: its capacity when it was allocated.
    room: usize,
    /// The table before the last growth, emptied [`STEP`] entries per write.
    retiring: Map<V>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Table {
            current: Map::new(),
            room: 0,
            retiring: Map::new(),
        }
    }
}

impl<V> Table<V> {
    pub(super) fn len(&self) -> usize {
        self.current.len() + self.retiring.len()
    }

    pub(super) fn get(&self, key: &Digest) -> Option<&V> {
        let h = hash(key);
        if !self.retiring.is_empty()
            && let Some((_, v)) = self.retiring.find(h, is(key))
        {
            return Some(v);
        }
        self.current.find(h, is(key)).map(|(_, v)| v)
    }

    pub(super) fn get_mut(&mut self, key: &Digest) -> Option<&mut V> {
        let h = hash(key);
        if !self.retiring.is_empty() {
            self.move_some(STEP);
            if let Some((_, v)) = self.retiring.find_mut(h, is(key)) {
                return Some(v);
            }
        }
        self.current.find_mut(h, is(key)).map(|(_, v)| v)
    }

    /// Inserts or replaces.
    pub(super) fn insert(&mut self, key: Digest, value: V) -> Inserted<V> {
        let h = hash(&key);
        if self.retiring.is_empty() && self.current.len() == self.current.capacity() {
            // A replacement needs no room; only a new key makes the table grow.
            if let Some((_, v)) = self.current.find_mut(h, is(&key)) {
                return Inserted::Replaced(mem::replace(v, value));
            }
            self.grow();
        }
        if !self.retiring.is_empty() {
            self.move_some(STEP);
            if let Ok(found) = self.retiring.find_entry(h, is(&key)) {
                let ((_, old), _) = found.remove();
                self.release_if_drained();
                self.current.insert_unique(h, (key, value), rehash);
                return Inserted::Replaced(old);
            }
        }
        if let Some((_, v)) = self.current.find_mut(h, is(&key)) {
            return Inserted::Replaced(mem::replace(v, value));
        }
        let at = self
            .current
            .insert_unique(h, (key, value), rehash)
            .bucket_index();
        let mask = self.current.num_buckets() - 1;
        Inserted::New {
            skipped: at.wrapping_sub(h as usize) & mask,
        }
    }

    /// Starts moving `current` into a new table: of its size when removed slots are what took
    /// its room (see the module's doc), twice its size when its entries did.
    fn grow(&mut self) {
        let (share, of) = REBUILD_AT_MOST;
        let capacity = if self.current.len() * of <= self.room * share {
            self.room
        } else {
            self.room * 2
        };
        self.retiring = mem::replace(&mut self.current, Map::with_capacity(capacity.max(16)));
        self.room = self.current.capacity();
    }

    /// Moves up to `n` entries from the retiring table. The first ones its iterator finds: the
    /// search reads only the table's control bytes (16 slots per instruction), not the entries.
    fn move_some(&mut self, n: usize) {
        let mut batch = [Digest([0; 32]); STEP];
        let mut found = 0;
        for (key, _) in self.retiring.iter().take(n.min(STEP)) {
            batch[found] = *key;
            found += 1;
        }
        for key in &batch[..found] {
            let h = hash(key);
            if let Ok(entry) = self.retiring.find_entry(h, is(key)) {
                let (moved, _) = entry.remove();
                self.current.insert_unique(h, moved, rehash);
            }
        }
        self.release_if_drained();
    }

    /// Gives the retiring table's memory back once its last entry has left.
    fn release_if_drained(&mut self) {
        if self.retiring.is_empty() {
            self.retiring = Map::new();
        }
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Digest, &V)> {
        self.current
            .iter()
            .chain(self.retiring.iter())
            .map(|(k, v)| (k, v))
    }

    /// Removes a key; a growth in progress is not advanced (the caller is taking entries out,
    /// which leaves the new table more room, not less).
    pub(super) fn remove(&mut self, key: &Digest) -> Option<V> {
        let h = hash(key);
        if !self.retiring.is_empty()
            && let Ok(found) = self.retiring.find_entry(h, is(key))
        {
            let ((_, v), _) = found.remove();
            self.release_if_drained();
            return Some(v);
        }
        let found = self.current.find_entry(h, is(key)).ok()?;
        Some(found.remove().0.1)
    }

    pub(super) fn retain(&mut self, mut keep: impl FnMut(&Digest, &mut V) -> bool) {
        self.current.retain(|(k, v)| keep(k, v));
        if !self.retiring.is_empty() {
            self.retiring.retain(|(k, v)| keep(k, v));
            self.release_if_drained();
        }
    }

    /// After a wave of removals: shrinks the table to twice what it holds when it holds under a
    /// quarter of its room (a table never shrinks by itself). A shard in the middle of a growth
    /// is left to finish it write by write; a later purge shrinks it.
    pub(super) fn shrink_if_sparse(&mut self) {
        if !self.retiring.is_empty() {
            return;
        }
        // Against the room it was allocated with: its `capacity` counts its entries and free
        // slots but not its removed ones, so a churned table of few entries would not read as
        // sparse.
        let len = self.current.len();
        if len * 4 < self.room {
            self.current.shrink_to(len * 2, rehash);
            self.room = self.current.capacity();
        }
    }

    #[cfg(test)]
    pub(super) fn growing(&self) -> bool {
        !self.retiring.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> Digest {
        Digest::of(&i.to_string())
    }

    /// A key whose hash names position `seq`, as a token's place does ([`crate::Place`]).
    fn placed(seq: u32, n: u64) -> Digest {
        let mut d = key(n);
        crate::Place::new(0, seq).mark(&mut d);
        d
    }

    fn skipped<V>(inserted: Inserted<V>) -> usize {
        match inserted {
            Inserted::New { skipped } => skipped,
            Inserted::Replaced(_) => panic!("a new key replaced one"),
        }
    }

    /// Keys whose places come in sequence land at their places. Over a stretch where every
    /// other slot is still taken (the live refresh tokens of an earlier round, beside its
    /// expired access tokens), each new key lands at the first free slot after its place, and
    /// the places that follow, moved on by what it skipped, keep the next keys from landing
    /// ever further behind: none skips more than one slot. Without moving the places on, the
    /// keys of that stretch land up to half its length away.
    #[test]
    fn keys_land_at_their_places_or_just_past_the_live_ones() {
        let mut t = Table::default();
        let n = 1500u32;
        for seq in 0..n {
            assert_eq!(skipped(t.insert(placed(seq, seq.into()), seq)), 0, "{seq}");
        }
        while t.growing() {
            t.get_mut(&placed(0, 0));
        }
        let buckets = t.current.num_buckets();
        assert!(
            buckets >= n as usize,
            "{buckets} buckets: the stretch does not wrap"
        );
        for seq in (0..n).step_by(2) {
            assert_eq!(t.remove(&placed(seq, seq.into())), Some(seq));
        }
        let (mut place, mut most) = (0u32, 0);
        for i in 0..n / 2 {
            let k = placed(place, u64::from(n + i));
            let s = skipped(t.insert(k, n + i));
            let at = t.current.find_bucket_index(hash(&k), is(&k)).unwrap();
            assert_eq!(at, place as usize + s, "where it landed, as reported");
            most = most.max(s);
            place += 1 + s as u32;
        }
        assert!(most <= 1, "a key skipped {most} slots");
        assert_eq!(t.len(), n as usize);
        assert_eq!(t.current.num_buckets(), buckets, "no growth");
        assert!(
            (1..n)
                .step_by(2)
                .all(|seq| t.get(&placed(seq, seq.into())) == Some(&seq))
        );

        // The same stretch with places that do not move on.
        let mut t = Table::default();
        for seq in 0..n {
            t.insert(placed(seq, seq.into()), seq);
        }
        while t.growing() {
            t.get_mut(&placed(0, 0));
        }
        for seq in (0..n).step_by(2) {
            t.remove(&placed(seq, seq.into()));
        }
        let most = (0..n / 2)
            .map(|i| skipped(t.insert(placed(i, u64::from(n + i)), n + i)))
            .max();
        assert!(most >= Some(n as usize / 4), "{most:?}");
    }

    #[test]
    fn growth_keeps_every_entry_and_moves_a_few_per_insert() {
        let mut t = Table::default();
        let mut growths = 0;
        let mut was_growing = false;
        for i in 0..20_000u64 {
            let retiring_before = t.retiring.len();
            assert_eq!(t.insert(key(i), i).replaced(), None);
            let retiring_after = t.retiring.len();
            // An insert moves at most STEP entries (or the rest at the end of a growth).
            if retiring_before > 0 && retiring_after > 0 {
                assert!(retiring_before - retiring_after <= STEP);
            }
            if t.growing() && !was_growing {
                growths += 1;
            }
            was_growing = t.growing();
            assert_eq!(t.len(), i as usize + 1);
            // Probe entries on both sides of a growth in progress.
            for j in [0, i / 2, i] {
                assert_eq!(t.get(&key(j)), Some(&j), "key {j} after {i} inserts");
            }
        }
        assert!(growths >= 8, "{growths} growths");
        assert_eq!(t.values().count(), 20_000);
        assert_eq!(t.get(&key(20_000)), None);
    }

    /// A table just past the insert that started a growth, and how many keys it holds.
    fn growing_table() -> (Table<u64>, u64) {
        let mut t = Table::default();
        let mut i = 0u64;
        while !t.growing() {
            t.insert(key(i), i);
            i += 1;
        }
        (t, i)
    }

    #[test]
    fn removal_during_a_growth_finds_a_key_on_either_side_once() {
        let (mut t, i) = growing_table();
        let old_side = t.retiring.iter().map(|(k, v)| (*k, *v)).next().unwrap();
        let new_side = t.current.iter().map(|(k, v)| (*k, *v)).next().unwrap();
        assert_eq!(t.iter().count(), t.len());
        assert_eq!(t.remove(&old_side.0), Some(old_side.1));
        assert_eq!(t.remove(&new_side.0), Some(new_side.1));
        assert_eq!((t.remove(&old_side.0), t.remove(&new_side.0)), (None, None));
        assert_eq!(t.len(), i as usize - 2);
        assert_eq!(t.iter().count(), t.len());
        assert!(t.iter().all(|(k, v)| *k == key(*v)));
    }

    #[test]
    fn replacing_removing_and_changing_during_a_growth() {
        let (mut t, i) = growing_table();
        // Key 0 is still in the retiring table: replacing it returns the old value, once.
        assert!(t.retiring.find(hash(&key(0)), is(&key(0))).is_some());
        assert_eq!(t.insert(key(0), 100).replaced(), Some(0));
        assert_eq!(t.get(&key(0)), Some(&100));
        assert_eq!(t.len(), i as usize);
        *t.get_mut(&key(1)).unwrap() += 1000;
        assert_eq!(t.get(&key(1)), Some(&1001));
        t.retain(|_, v| *v % 2 == 1);
        let odd = t.values().count();
        assert_eq!(t.len(), odd);
        assert!(t.values().all(|v| v % 2 == 1));
        // Writes finish the growth; the table then shrinks once it is sparse.
        let mut j = 1_000_000u64;
        while t.growing() {
            t.insert(key(j), j);
            j += 1;
        }
        t.retain(|k, _| *k == key(1));
        t.shrink_if_sparse();
        assert_eq!(t.len(), 1);
        assert!(t.current.capacity() < 16, "{}", t.current.capacity());
        assert_eq!(t.get(&key(1)), Some(&1001));
        assert_eq!(t.get(&key(0)), None);
    }

    /// A table that removes as many keys as it takes runs out of room to the slots its removals
    /// leave marked; it is rebuilt at its size, as often as that happens, keeping every key.
    #[test]
    fn churn_at_a_steady_size_rebuilds_a_table_at_its_size() {
        let mut t = Table::default();
        let mut next = 0u64;
        while t.len() < 2_500 || t.growing() {
            t.insert(key(next), next);
            next += 1;
        }
        let room = t.room;
        let len = t.len();
        assert!(len * 4 <= room * 3, "{len} entries in a room of {room}");
        let mut oldest = 0u64;
        // One key in, the oldest out.
        let churn = |t: &mut Table<u64>, next: &mut u64, oldest: &mut u64| {
            assert_eq!(t.insert(key(*next), *next).replaced(), None);
            *next += 1;
            assert_eq!(t.remove(&key(*oldest)), Some(*oldest));
            *oldest += 1;
        };
        let (mut rebuilds, mut was_growing) = (0, false);
        for _ in 0..20 * len {
            churn(&mut t, &mut next, &mut oldest);
            rebuilds += usize::from(t.growing() && !was_growing);
            was_growing = t.growing();
        }
        assert!(rebuilds >= 2, "{rebuilds} rebuilds");
        while t.growing() {
            t.insert(key(next), next);
            next += 1;
        }
        assert_eq!(t.room, room, "rebuilt at its size, not doubled");
        assert_eq!(t.len(), (next - oldest) as usize);
        assert!((oldest..next).all(|i| t.get(&key(i)) == Some(&i)));
        // Churned on to just before its next rebuild, its room is mostly removed slots; a purge
        // that leaves a tenth still shrinks it.
        while t.growing() || t.current.capacity() > t.len() + 16 {
            churn(&mut t, &mut next, &mut oldest);
        }
        let keep = oldest + (next - oldest) / 10;
        t.retain(|_, v| *v < keep);
        t.shrink_if_sparse();
        assert!(
            t.room * 2 <= room,
            "room {} after a purge, {room} before",
            t.room
        );
        assert!((oldest..keep).all(|i| t.get(&key(i)) == Some(&i)));
    }

    #[test]
    fn replacing_a_key_when_the_table_is_full_does_not_grow_or_duplicate_it() {
        let mut t = Table::default();
        let mut i = 0u64;
        t.insert(key(i), i);
        while t.current.len() < t.current.capacity() {
            i += 1;
            t.insert(key(i), i);
        }
        assert!(!t.growing());
        let len = t.len();
        assert_eq!(t.insert(key(0), 7).replaced(), Some(0));
        assert_eq!(t.len(), len);
        assert_eq!(t.get(&key(0)), Some(&7));
        assert_eq!(t.values().count(), len);
        // The next new key grows it; key 0 keeps its new value through the move.
        assert_eq!(t.insert(key(i + 1), 0).replaced(), None);
        assert!(t.growing());
        while t.growing() {
            i += 1;
            t.insert(key(i + 1), 0);
        }
        assert_eq!(t.get(&key(0)), Some(&7));
        assert_eq!(t.len(), t.values().count());
    }
}
