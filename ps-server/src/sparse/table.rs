//! The rows of one table on one shard (one stripe of it): an index from id to row slot,
//! values and slots in flat arrays, per-row bookkeeping for the optimizers and the eviction
//! policies, and the counters of ids still waiting for admission.
//!
//! Plain data, no locks and no I/O: the caller holds the stripe's lock and feeds it batches
//! of unique ids (repeated ids are summed before they get here).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use parasync_tensor::{bf16, DType};

use super::def::{mix64, Admission, Eviction, TableDef, GOLDEN_GAMMA};

/// Hashes ids with SplitMix64's finaliser (ids are often small consecutive integers).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix64(self.0 ^ b as u64);
        }
    }
    fn write_u64(&mut self, id: u64) {
        self.0 = mix64(id);
    }
}

pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Bookkeeping of one row.
#[derive(Clone, Copy, Debug, Default)]
struct RowMeta {
    id: u64,
    /// The table tick of its last update (least recently used goes first).
    tick: u64,
    /// Updates since it was created (least frequently used goes first).
    updates: u32,
    /// The row's own update count: lazy Adam's `t`.
    steps: u32,
    /// The step of its last update (time to live).
    step: u64,
}

/// Counters of a stripe; the table sums its stripes'.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounts {
    /// Rows created.
    pub admitted: u64,
    /// Rows evicted.
    pub evicted: u64,
    /// Row updates dropped: the id was not admitted yet, or the table was full.
    pub dropped: u64,
    /// Row updates applied.
    pub updated: u64,
    /// Times the admission counters were full and started over.
    pub admission_resets: u64,
}

/// Rows of one stripe of a table.
pub struct Rows {
    dim: usize,
    /// Rows this stripe may hold (0: no limit).
    capacity: usize,
    /// Rows evicted at once when full: at least one; spreading the scan over many inserts.
    evict_batch: usize,
    index: IdMap<u32>,
    meta: Vec<RowMeta>,
    values: Values,
    /// `num_slots` arrays of `dim` f32 per row slot.
    slots: Vec<Vec<f32>>,
    /// Row slots given up by evicted rows, reused first.
    free: Vec<u32>,
    /// Ids not admitted yet: how often each was seen.
    seen: IdMap<u32>,
    /// Most ids `seen` holds; past it, it starts over (counted).
    seen_limit: usize,
    tick: u64,
    /// The last step a time-to-live sweep ran at.
    swept_at: u64,
    counts: TableCounts,
}

enum Values {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Rows {
    /// An empty stripe of `def`'s table, holding at most `capacity` rows (0: no limit) and
    /// evicting `evict_batch` rows at once when full.
    pub fn new(def: &TableDef, capacity: usize, evict_batch: usize) -> Self {
        let values = match def.dtype {
            DType::F32 => Values::F32(Vec::new()),
            DType::Bf16 => Values::Bf16(Vec::new()),
        };
        Rows {
            dim: def.dim as usize,
            capacity,
            evict_batch: evict_batch.max(1),
            index: IdMap::default(),
            meta: Vec::new(),
            values,
            slots: vec![Vec::new(); def.optimizer.num_slots()],
            free: Vec::new(),
            seen: IdMap::default(),
            seen_limit: if capacity > 0 { capacity.max(1 << 16) } else { 1 << 22 },
            tick: 0,
            swept_at: 0,
            counts: TableCounts::default(),
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The counters so far.
    pub fn counts(&self) -> TableCounts {
        self.counts
    }

    /// Whether `id` has a row.
    pub fn contains(&self, id: u64) -> bool {
        self.index.contains_key(&id)
    }

    /// The ids held, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.keys().copied()
    }

    /// Writes the rows of `ids` into `out` (`ids.len() * dim` values): the held row, or the
    /// initial row of an id without one. Changes nothing.
    pub fn lookup(&self, def: &TableDef, ids: &[u64], out: &mut [f32]) {
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.dim)) {
            match self.index.get(&id) {
                Some(&slot) => self.read_row(slot as usize, row),
                None => {
                    def.init.fill(id, row);
                    if let Values::Bf16(_) = self.values {
                        // As the row will be stored once it exists.
                        row.iter_mut().for_each(|x| *x = bf16::to_f32(bf16::from_f32_rne(*x)));
                    }
                }
            }
        }
    }

    fn read_row(&self, slot: usize, row: &mut [f32]) {
        let at = slot * self.dim;
        match &self.values {
            Values::F32(v) => row.copy_from_slice(&v[at..at + self.dim]),
            Values::Bf16(v) => row.iter_mut().zip(&v[at..at + self.dim]).for_each(|(x, &w)| *x = bf16::to_f32(w)),
        }
    }

    /// Applies one gradient row per id (`ids` unique, `grads` `ids.len() * dim` values) at
    /// learning rate `lr`, for `step` (the time-to-live clock). Ids without a row go through
    /// admission, and a new row may first evict others. `scratch` holds one row.
    pub fn push(&mut self, def: &TableDef, ids: &[u64], grads: &[f32], lr: f32, step: u64) {
        self.tick += 1;
        if let Eviction::Ttl { steps } = def.eviction {
            if step >= self.swept_at.saturating_add(steps) {
                self.evict_older_than(step.saturating_sub(steps));
                self.swept_at = step;
            }
        }
        let mut scratch = vec![0f32; self.dim];
        for (&id, g) in ids.iter().zip(grads.chunks_exact(self.dim)) {
            let slot = match self.index.get(&id) {
                Some(&slot) => slot as usize,
                None => {
                    if !self.admit(def, id) {
                        self.counts.dropped += 1;
                        continue;
                    }
                    match self.create(def, id, step) {
                        Some(slot) => slot,
                        None => {
                            self.counts.dropped += 1;
                            continue;
                        }
                    }
                }
            };
            self.update(def, slot, g, lr, step, &mut scratch);
        }
    }

    /// Whether this update of `id` (which has no row) creates its row.
    fn admit(&mut self, def: &TableDef, id: u64) -> bool {
        let (need, p_seed) = match def.admission {
            Admission::Always => return true,
            Admission::MinCount(n) => (n, None),
            Admission::Probability { p, seed } => (u32::MAX, Some((p, seed))),
        };
        if self.seen.len() >= self.seen_limit && !self.seen.contains_key(&id) {
            self.seen.clear();
            self.counts.admission_resets += 1;
        }
        let seen = self.seen.entry(id).or_insert(0);
        *seen = seen.saturating_add(1);
        let admitted = match p_seed {
            None => *seen >= need,
            Some((p, seed)) => {
                let draw = mix64(seed ^ mix64(id) ^ (*seen as u64).wrapping_mul(GOLDEN_GAMMA));
                (draw >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < p as f64
            }
        };
        if admitted {
            self.seen.remove(&id);
        }
        admitted
    }

    /// A new row for `id` with its initial values, evicting first if the stripe is full;
    /// `None` if no room can be made.
    fn create(&mut self, def: &TableDef, id: u64, step: u64) -> Option<usize> {
        if self.capacity > 0 && self.index.len() >= self.capacity {
            match def.eviction {
                Eviction::None => {}
                Eviction::Lru => self.evict_lowest(self.evict_batch, |m| (0, m.tick, m.id)),
                Eviction::Lfu => self.evict_lowest(self.evict_batch, |m| (m.updates as u64, m.tick, m.id)),
                Eviction::Ttl { steps } => self.evict_older_than(step.saturating_sub(steps)),
            }
            if self.index.len() >= self.capacity {
                return None;
            }
        }
        let slot = match self.free.pop() {
            Some(s) => s as usize,
            None => {
                let s = self.meta.len();
                self.meta.push(RowMeta::default());
                match &mut self.values {
                    Values::F32(v) => v.resize(v.len() + self.dim, 0.0),
                    Values::Bf16(v) => v.resize(v.len() + self.dim, 0),
                }
                for (k, sl) in self.slots.iter_mut().enumerate() {
                    sl.resize(sl.len() + self.dim, def.optimizer.slot_start(k));
                }
                s
            }
        };
        self.meta[slot] = RowMeta { id, tick: self.tick, updates: 0, steps: 0, step };
        let at = slot * self.dim;
        let mut row = vec![0f32; self.dim];
        def.init.fill(id, &mut row);
        match &mut self.values {
            Values::F32(v) => v[at..at + self.dim].copy_from_slice(&row),
            Values::Bf16(v) => v[at..at + self.dim].iter_mut().zip(&row).for_each(|(w, &x)| *w = bf16::from_f32_rne(x)),
        }
        for (k, sl) in self.slots.iter_mut().enumerate() {
            sl[at..at + self.dim].fill(def.optimizer.slot_start(k));
        }
        self.index.insert(id, slot as u32);
        self.counts.admitted += 1;
        Some(slot)
    }

    fn update(&mut self, def: &TableDef, slot: usize, g: &[f32], lr: f32, step: u64, scratch: &mut [f32]) {
        let at = slot * self.dim;
        let range = at..at + self.dim;
        let (s0, s1) = match self.slots.as_mut_slice() {
            [] => (&mut [][..], &mut [][..]),
            [a] => (&mut a[range.clone()], &mut [][..]),
            [a, b, ..] => (&mut a[range.clone()], &mut b[range.clone()]),
        };
        let m = &mut self.meta[slot];
        match &mut self.values {
            Values::F32(v) => def.optimizer.apply(lr, &mut v[range], s0, s1, &mut m.steps, g),
            Values::Bf16(v) => {
                let words = &mut v[range];
                scratch.iter_mut().zip(words.iter()).for_each(|(x, &w)| *x = bf16::to_f32(w));
                def.optimizer.apply(lr, scratch, s0, s1, &mut m.steps, g);
                words.iter_mut().zip(scratch.iter()).for_each(|(w, &x)| *w = bf16::from_f32_rne(x));
            }
        }
        m.tick = self.tick;
        m.updates = m.updates.saturating_add(1);
        m.step = m.step.max(step);
        self.counts.updated += 1;
    }

    /// Evicts the `n` rows with the lowest `key` (keys end with the id, so they are unique
    /// and the choice does not depend on the map's order).
    fn evict_lowest(&mut self, n: usize, key: impl Fn(&RowMeta) -> (u64, u64, u64)) {
        let mut held: Vec<((u64, u64, u64), u32)> = self.index.values().map(|&s| (key(&self.meta[s as usize]), s)).collect();
        let n = n.min(held.len());
        if n == 0 {
            return;
        }
        if n < held.len() {
            held.select_nth_unstable(n - 1);
        }
        for &(_, slot) in &held[..n] {
            self.remove(slot);
        }
    }

    /// Evicts every row last updated before step `oldest`.
    fn evict_older_than(&mut self, oldest: u64) {
        let old: Vec<u32> = self.index.values().copied().filter(|&s| self.meta[s as usize].step < oldest).collect();
        for slot in old {
            self.remove(slot);
        }
    }

    fn remove(&mut self, slot: u32) {
        let id = self.meta[slot as usize].id;
        self.index.remove(&id);
        self.free.push(slot);
        self.counts.evicted += 1;
    }

    /// Bytes allocated for rows (values, slots, bookkeeping, index), for memory figures.
    pub fn allocated_bytes(&self) -> u64 {
        let values = match &self.values {
            Values::F32(v) => v.capacity() * 4,
            Values::Bf16(v) => v.capacity() * 2,
        };
        let slots: usize = self.slots.iter().map(|s| s.capacity() * 4).sum();
        let meta = self.meta.capacity() * std::mem::size_of::<RowMeta>();
        // hashbrown: a key, a value and a control byte per bucket.
        let index = self.index.capacity() * (8 + 4 + 1) + self.seen.capacity() * (8 + 4 + 1);
        (values + slots + meta + index + self.free.capacity() * 4) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::def::RowInit;
    use crate::sparse::rows::RowOptimizer;

    fn def(admission: Admission, eviction: Eviction, capacity: u64) -> TableDef {
        TableDef {
            name: "t".into(),
            dim: 2,
            dtype: DType::F32,
            init: RowInit::Zeros,
            optimizer: RowOptimizer::Sgd { lr: 1.0 },
            admission,
            eviction,
            capacity,
        }
    }

    /// Pushes gradient rows of ones for each batch of ids, one step per batch.
    fn stream(rows: &mut Rows, d: &TableDef, batches: &[&[u64]]) {
        for (step, ids) in batches.iter().enumerate() {
            rows.push(d, ids, &vec![1.0; ids.len() * 2], 1.0, step as u64);
        }
    }

    fn held(rows: &Rows) -> Vec<u64> {
        let mut v: Vec<u64> = rows.ids().collect();
        v.sort();
        v
    }

    #[test]
    fn min_count_admits_on_the_nth_update_and_drops_the_ones_before() {
        let d = def(Admission::MinCount(3), Eviction::None, 0);
        let mut r = Rows::new(&d, 0, 1);
        stream(&mut r, &d, &[&[1, 2], &[1], &[1, 2], &[1]]);
        assert_eq!(held(&r), [1]);
        let mut out = [0.0; 4];
        r.lookup(&d, &[1, 2], &mut out);
        // Row 1 was created by its third update and updated once more; row 2 has no row yet.
        assert_eq!(out, [-2.0, -2.0, 0.0, 0.0]);
        assert_eq!(r.counts(), TableCounts { admitted: 1, evicted: 0, dropped: 4, updated: 2, admission_resets: 0 });
    }

    #[test]
    fn probability_admission_is_the_same_on_every_run() {
        let d = def(Admission::Probability { p: 0.25, seed: 9 }, Eviction::None, 0);
        let ids: Vec<u64> = (0..4000).collect();
        let run = || {
            let mut r = Rows::new(&d, 0, 1);
            stream(&mut r, &d, &[&ids]);
            held(&r)
        };
        let first = run();
        assert_eq!(first, run());
        assert!((850..1150).contains(&first.len()), "{} of 4000 admitted at p = 0.25", first.len());
        // A second sighting gives the ids left out another draw.
        let mut r = Rows::new(&d, 0, 1);
        stream(&mut r, &d, &[&ids, &ids]);
        assert!((1600..2000).contains(&r.len()), "{}", r.len());
    }

    /// (policy, capacity, batches of updated ids, rows that must remain)
    type Case = (Eviction, u64, &'static [&'static [u64]], &'static [u64]);

    const CASES: &[Case] = &[
        // Full with 1, 2, 3; 1 is updated again, so 2 is the least recently used.
        (Eviction::Lru, 3, &[&[1, 2, 3], &[1], &[4]], &[1, 3, 4]),
        (Eviction::Lru, 2, &[&[1], &[2], &[3], &[4]], &[3, 4]),
        // Equal recency is broken by the id: the lowest goes.
        (Eviction::Lru, 2, &[&[5, 6], &[7]], &[6, 7]),
        // 2 and 3 were updated twice, 1 once: 1 goes although it is more recent than 2.
        (Eviction::Lfu, 3, &[&[2, 3], &[2, 3], &[1], &[4]], &[2, 3, 4]),
        // Among equally frequent rows, the least recent goes.
        (Eviction::Lfu, 2, &[&[1], &[2], &[3]], &[2, 3]),
        // Time to live 2 steps: full with 1, 2 (step 0) and 3 (step 1); a new row at step 3
        // makes room by evicting the rows last updated before step 1.
        (Eviction::Ttl { steps: 2 }, 3, &[&[1, 2], &[3], &[], &[4]], &[3, 4]),
        // Full and nothing old enough: the new row is not created.
        (Eviction::Ttl { steps: 10 }, 2, &[&[1], &[2], &[3]], &[1, 2]),
        (Eviction::None, 2, &[&[1, 2], &[3], &[1]], &[1, 2]),
    ];

    #[test]
    fn each_eviction_policy_keeps_exactly_the_expected_rows() {
        for (i, &(eviction, capacity, batches, expected)) in CASES.iter().enumerate() {
            let d = def(Admission::Always, eviction, capacity);
            let mut r = Rows::new(&d, capacity as usize, 1);
            stream(&mut r, &d, batches);
            assert_eq!(held(&r), expected, "case {i}: {eviction:?} capacity {capacity}");
        }
    }

    #[test]
    fn an_evicted_id_that_comes_back_starts_fresh() {
        let mut d = def(Admission::Always, Eviction::Lru, 1);
        d.init = RowInit::Uniform { low: 0.0, high: 1.0, seed: 3 };
        let mut r = Rows::new(&d, 1, 1);
        let mut initial = [0.0; 2];
        d.init.fill(7, &mut initial);
        stream(&mut r, &d, &[&[7], &[7], &[8], &[7]]);
        let mut out = [0.0; 2];
        r.lookup(&d, &[7], &mut out);
        assert_eq!(out, [initial[0] - 1.0, initial[1] - 1.0]);
        assert_eq!((r.counts().evicted, r.counts().admitted), (2, 3));
    }

    #[test]
    fn evicting_in_batches_keeps_the_most_recent() {
        let d = def(Admission::Always, Eviction::Lru, 100);
        let mut r = Rows::new(&d, 100, 10);
        for id in 0..105u64 {
            r.push(&d, &[id], &[1.0, 1.0], 1.0, id);
        }
        // At id 100 the ten least recent (0..10) went; 100..105 fitted after that.
        assert_eq!(r.len(), 95);
        assert_eq!(held(&r), (10..105).collect::<Vec<_>>());
    }

    #[test]
    fn bf16_rows_round_to_nearest_even_after_each_update() {
        let mut d = def(Admission::Always, Eviction::None, 0);
        d.dtype = DType::Bf16;
        d.init = RowInit::Uniform { low: 1.0, high: 2.0, seed: 1 };
        let mut r = Rows::new(&d, 0, 1);
        r.push(&d, &[3], &[0.5, 0.25], 1.0, 0);
        let mut start = [0.0; 2];
        d.init.fill(3, &mut start);
        let expect = |x0: f32, g: f32| bf16::to_f32(bf16::from_f32_rne(bf16::to_f32(bf16::from_f32_rne(x0)) - g));
        let mut out = [0.0; 2];
        r.lookup(&d, &[3], &mut out);
        assert_eq!(out, [expect(start[0], 0.5), expect(start[1], 0.25)]);
    }
}
