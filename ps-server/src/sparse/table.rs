//! The rows of one table on one shard (one stripe of it): an index from id to row slot,
//! values and slots in flat arrays, per-row bookkeeping for the optimizers and the eviction
//! policies, and the counters of ids still waiting for admission.
//!
//! Plain data, no locks and no I/O: the caller holds the stripe's lock and feeds it batches
//! of unique ids (repeated ids are summed before they get here).

use parasync_tensor::{bf16, DType};

use super::def::{mix64, Admission, Eviction, TableDef, GOLDEN_GAMMA};
use super::index::RowIndex;

/// A shard's maps keyed by id: SplitMix64's finaliser of the id and a key drawn when the
/// process starts (ids come from the network: a fixed hash would let a client send ids
/// that all collide).
pub(crate) type IdMap<V> = std::collections::HashMap<u64, V, KeyedIds>;

/// Builds the hashers of [`IdMap`]s with this process's key.
#[derive(Clone, Copy)]
pub(crate) struct KeyedIds(u64);

impl Default for KeyedIds {
    fn default() -> Self {
        KeyedIds(id_key())
    }
}

/// This process's key for hashing ids (drawn once, at first use).
pub(crate) fn id_key() -> u64 {
    static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KEY.get_or_init(rand::random::<u64>)
}

impl std::hash::BuildHasher for KeyedIds {
    type Hasher = parasync_proto::sparse::IdHasher;
    fn build_hasher(&self) -> Self::Hasher {
        parasync_proto::sparse::IdHasher::keyed(self.0)
    }
}

/// How many rows ahead an update or a lookup fetches the row it will work on.
const PREFETCH_ROWS: usize = 8;

/// How many ids ahead a batch fetches the index entry of the id it will look for.
const PREFETCH_IDS: usize = 16;

/// Asks the CPU to bring the `bytes` at `p` into its caches (a hint: nothing on other CPUs).
#[inline(always)]
pub(crate) fn prefetch_bytes(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut off = 0;
        while off < bytes {
            // SAFETY: prefetching never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast()) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

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

/// Rows of one stripe of a table. `Clone` copies everything (a plain memory copy of its
/// arrays and maps): what a checkpoint takes under the stripe's lock.
#[derive(Clone)]
pub struct Rows {
    dim: usize,
    /// Rows this stripe may hold (0: no limit).
    capacity: usize,
    /// Rows evicted at once when full: at least one; spreading the scan over many inserts.
    evict_batch: usize,
    index: RowIndex,
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

#[derive(Clone)]
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
            index: RowIndex::new(id_key()),
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
        self.index.contains(id)
    }

    /// The ids held, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.iter().map(|(id, _)| id)
    }

    /// Writes the rows of `ids` into `out` (`ids.len() * dim` values): the held row, or the
    /// initial row of an id without one. Changes nothing.
    pub fn lookup(&self, def: &TableDef, ids: &[u64], out: &mut [f32]) {
        let row_bytes = self.dim * 4;
        let out = parasync_tensor::f32_as_le_bytes_mut(out);
        self.lookup_rows(def, ids.iter().copied().zip(out.chunks_exact_mut(row_bytes)), DType::F32);
    }

    /// [`Rows::lookup`] for rows given one by one, each written as `wire` (`dim` elements
    /// of it): first every id's slot, then the rows, each fetching the rows a few places
    /// ahead (as in [`Rows::push_rows`]). Rows go straight from storage into the reply: no
    /// f32 copy of them is made first.
    pub fn lookup_rows<'o>(&self, def: &TableDef, rows: impl Iterator<Item = (u64, &'o mut [u8])>, wire: DType) {
        let rows: Vec<(u64, &'o mut [u8])> = rows.collect();
        let mut slots: Vec<Option<u32>> = Vec::with_capacity(rows.len());
        for k in 0..rows.len() {
            if let Some(&(ahead, _)) = rows.get(k + PREFETCH_IDS) {
                self.index.prefetch(ahead);
            }
            slots.push(self.index.get(rows[k].0));
        }
        let mut todo: Vec<(u64, Option<u32>, &'o mut [u8])> = rows.into_iter().zip(slots).map(|((id, row), slot)| (id, slot, row)).collect();
        let mut scratch = vec![0f32; self.dim];
        for k in 0..todo.len() {
            if let Some(&(_, Some(ahead), _)) = todo.get(k + PREFETCH_ROWS) {
                self.prefetch_values(ahead as usize);
            }
            let (id, slot, row) = &mut todo[k];
            match *slot {
                Some(slot) => self.read_row(slot as usize, row, wire, &mut scratch),
                None => {
                    self.initial_row(def, *id, &mut scratch);
                    parasync_tensor::encode_f32_into(&scratch, wire, row);
                }
            }
        }
    }

    /// The row an id without one reads: its initial row, as it will be stored.
    fn initial_row(&self, def: &TableDef, id: u64, row: &mut [f32]) {
        def.init.fill(id, row);
        if let Values::Bf16(_) = self.values {
            row.iter_mut().for_each(|x| *x = bf16::to_f32(bf16::from_f32_rne(*x)));
        }
    }

    /// Row `slot` as `wire` bytes (`scratch`: one row of f32, for bf16 storage read as f32).
    #[inline]
    fn read_row(&self, slot: usize, out: &mut [u8], wire: DType, scratch: &mut [f32]) {
        let at = slot * self.dim;
        match (&self.values, wire) {
            (Values::F32(v), _) => parasync_tensor::encode_f32_into(&v[at..at + self.dim], wire, out),
            (Values::Bf16(v), DType::Bf16) => out.copy_from_slice(parasync_tensor::u16_as_le_bytes(&v[at..at + self.dim])),
            (Values::Bf16(v), DType::F32) => {
                scratch.iter_mut().zip(&v[at..at + self.dim]).for_each(|(x, &w)| *x = bf16::to_f32(w));
                out.copy_from_slice(parasync_tensor::f32_as_le_bytes(scratch));
            }
        }
    }

    /// Applies one gradient row per id (`ids` unique, `grads` `ids.len() * dim` values) at
    /// learning rate `lr`, for `step` (the time-to-live clock). Ids without a row go through
    /// admission, and a new row may first evict others. `scratch` holds one row.
    pub fn push(&mut self, def: &TableDef, ids: &[u64], grads: &[f32], lr: f32, step: u64) {
        let dim = self.dim;
        self.push_rows(def, ids.iter().copied().zip(grads.chunks_exact(dim)), lr, step);
    }

    /// [`Rows::push`] for rows given one by one (ids unique): a table's stripe takes its
    /// part of a batch without copying it out first.
    pub fn push_rows<'g>(&mut self, def: &TableDef, rows: impl Iterator<Item = (u64, &'g [f32])>, lr: f32, step: u64) {
        self.push_rows_within(def, rows, lr, step, usize::MAX)
    }

    /// [`Rows::push_rows`] creating at most `room` new rows: the updates of further ids
    /// without a row are dropped (counted as dropped).
    pub fn push_rows_within<'g>(&mut self, def: &TableDef, rows: impl Iterator<Item = (u64, &'g [f32])>, lr: f32, step: u64, room: usize) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2. (No FMA: the results are the same bits either way.)
            return unsafe { self.push_avx2(def, rows, lr, step, room) };
        }
        self.push_any(def, rows, lr, step, room)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn push_avx2<'g>(&mut self, def: &TableDef, rows: impl Iterator<Item = (u64, &'g [f32])>, lr: f32, step: u64, room: usize) {
        self.push_any(def, rows, lr, step, room)
    }

    #[inline(always)]
    fn push_any<'g>(&mut self, def: &TableDef, rows: impl Iterator<Item = (u64, &'g [f32])>, lr: f32, step: u64, room: usize) {
        self.tick += 1;
        if let Eviction::Ttl { steps } = def.eviction {
            if step >= self.swept_at.saturating_add(steps) {
                self.evict_older_than(step.saturating_sub(steps));
                self.swept_at = step;
            }
        }
        // First the rows' slots (admitting and creating rows), then the updates: the rows lie
        // anywhere in memory, so each update fetches the rows a few places ahead of it while
        // it works (one row at a time would wait for memory at every row). A new row that
        // has to evict others first applies the updates found so far, so that the result is
        // that of updating the rows one after the other: no row waiting for its update is
        // evicted (nor its slot given to another row) before the update.
        let rows: Vec<(u64, &[f32])> = rows.collect();
        let mut todo: Vec<(usize, &[f32])> = Vec::with_capacity(rows.len());
        let mut scratch = vec![0f32; self.dim];
        let mut created = 0;
        for k in 0..rows.len() {
            if let Some(&(ahead, _)) = rows.get(k + PREFETCH_IDS) {
                self.index.prefetch(ahead);
            }
            let (id, g) = rows[k];
            let slot = match self.index.get(id) {
                Some(slot) => slot as usize,
                None => {
                    if created == room || !self.admit(def, id) {
                        self.counts.dropped += 1;
                        continue;
                    }
                    created += 1;
                    if self.capacity > 0 && self.index.len() >= self.capacity {
                        self.apply_updates(def, &mut todo, lr, step, &mut scratch);
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
            todo.push((slot, g));
        }
        self.apply_updates(def, &mut todo, lr, step, &mut scratch);
    }

    /// Applies the updates of `todo` in order (fetching rows ahead) and empties it.
    #[inline(always)]
    fn apply_updates(&mut self, def: &TableDef, todo: &mut Vec<(usize, &[f32])>, lr: f32, step: u64, scratch: &mut [f32]) {
        for k in 0..todo.len() {
            if let Some(&(ahead, _)) = todo.get(k + PREFETCH_ROWS) {
                self.prefetch(ahead);
            }
            let (slot, g) = todo[k];
            self.update(def, slot, g, lr, step, scratch);
        }
        todo.clear();
    }

    /// Asks the CPU to bring row `slot`'s values, slots and bookkeeping into its caches.
    #[inline(always)]
    fn prefetch(&self, slot: usize) {
        self.prefetch_values(slot);
        let at = slot * self.dim;
        for sl in &self.slots {
            prefetch_bytes(sl[at..].as_ptr().cast(), self.dim * 4);
        }
        prefetch_bytes((&self.meta[slot] as *const RowMeta).cast(), std::mem::size_of::<RowMeta>());
    }

    /// Asks the CPU to bring row `slot`'s values into its caches.
    #[inline(always)]
    fn prefetch_values(&self, slot: usize) {
        let at = slot * self.dim;
        match &self.values {
            Values::F32(v) => prefetch_bytes(v[at..].as_ptr().cast(), self.dim * 4),
            Values::Bf16(v) => prefetch_bytes(v[at..].as_ptr().cast(), self.dim * 2),
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

    #[inline(always)]
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
        let mut held: Vec<((u64, u64, u64), u32)> = self.index.iter().map(|(_, s)| (key(&self.meta[s as usize]), s)).collect();
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
        let old: Vec<u32> = self.index.iter().map(|(_, s)| s).filter(|&s| self.meta[s as usize].step < oldest).collect();
        for slot in old {
            self.remove(slot);
        }
    }

    fn remove(&mut self, slot: u32) {
        let id = self.meta[slot as usize].id;
        self.index.remove(id);
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
        let index = self.index.capacity() * 16 + self.seen.capacity() * (8 + 4 + 1);
        (values + slots + meta + index + self.free.capacity() * 4) as u64
    }
}

/// The values of packed rows, in the table's storage dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum RowValues {
    F32(Vec<f32>),
    /// bf16 words.
    Bf16(Vec<u16>),
}

impl RowValues {
    fn empty(dtype: DType) -> RowValues {
        match dtype {
            DType::F32 => RowValues::F32(Vec::new()),
            DType::Bf16 => RowValues::Bf16(Vec::new()),
        }
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        match self {
            RowValues::F32(_) => DType::F32,
            RowValues::Bf16(_) => DType::Bf16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            RowValues::F32(v) => v.len(),
            RowValues::Bf16(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends elements `range` of `other` (of the same dtype).
    fn extend_from(&mut self, other: &RowValues, range: std::ops::Range<usize>) {
        match (self, other) {
            (RowValues::F32(a), RowValues::F32(b)) => a.extend_from_slice(&b[range]),
            (RowValues::Bf16(a), RowValues::Bf16(b)) => a.extend_from_slice(&b[range]),
            _ => unreachable!("rows of one table share a dtype"),
        }
    }
}

/// The bookkeeping of one held row, as a checkpoint keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowState {
    /// The stripe's tick at its last update (least recently used order).
    pub tick: u64,
    /// Updates since it was created (least frequently used order).
    pub updates: u32,
    /// Its own update count (lazy Adam's `t`).
    pub steps: u32,
    /// The step of its last update (time to live).
    pub step: u64,
}

/// A stripe's clocks and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StripeState {
    /// Batches of updates the stripe has applied (the clock of least recently used order).
    pub tick: u64,
    /// The last step a time-to-live sweep ran at.
    pub swept_at: u64,
    pub counts: TableCounts,
}

/// Held rows and admission counters, packed as a checkpoint stores them: row `k` is id
/// `ids[k]`, its values `values[k * dim..(k + 1) * dim]` (each slot's alike) and its
/// bookkeeping `meta[k]`; `seen_counts[k]` is how often `seen_ids[k]` (no row yet) was seen.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedRows {
    pub dim: usize,
    pub ids: Vec<u64>,
    pub values: RowValues,
    /// One array per optimizer slot, in the optimizer's order.
    pub slots: Vec<Vec<f32>>,
    pub meta: Vec<RowState>,
    pub seen_ids: Vec<u64>,
    pub seen_counts: Vec<u32>,
}

impl PackedRows {
    /// No rows: `dim` elements of `dtype` per row, `num_slots` slots.
    pub fn empty(dim: usize, dtype: DType, num_slots: usize) -> PackedRows {
        PackedRows {
            dim,
            ids: Vec::new(),
            values: RowValues::empty(dtype),
            slots: vec![Vec::new(); num_slots],
            meta: Vec::new(),
            seen_ids: Vec::new(),
            seen_counts: Vec::new(),
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Checks that every array has the length the ids ask for; the error says which not.
    pub fn check(&self) -> Result<(), String> {
        let (n, dim) = (self.ids.len(), self.dim);
        if self.values.len() != n * dim {
            return Err(format!("{n} rows of {dim} need {} values, got {}", n * dim, self.values.len()));
        }
        if let Some((k, s)) = self.slots.iter().enumerate().find(|(_, s)| s.len() != n * dim) {
            return Err(format!("{n} rows of {dim} need {} values of slot {k}, got {}", n * dim, s.len()));
        }
        if self.meta.len() != n {
            return Err(format!("{n} rows need {n} row records, got {}", self.meta.len()));
        }
        if self.seen_ids.len() != self.seen_counts.len() {
            return Err(format!("{} admission ids with {} counts", self.seen_ids.len(), self.seen_counts.len()));
        }
        Ok(())
    }

    /// Appends every row and admission counter to the bucket of `into` that `route` names for
    /// its id (`None`: left out).
    pub fn route_into(&self, into: &mut [PackedRows], route: impl Fn(u64) -> Option<usize>) {
        let dim = self.dim;
        for (k, &id) in self.ids.iter().enumerate() {
            let Some(b) = route(id) else { continue };
            let out = &mut into[b];
            out.ids.push(id);
            out.values.extend_from(&self.values, k * dim..(k + 1) * dim);
            for (o, s) in out.slots.iter_mut().zip(&self.slots) {
                o.extend_from_slice(&s[k * dim..(k + 1) * dim]);
            }
            out.meta.push(self.meta[k]);
        }
        for (&id, &count) in self.seen_ids.iter().zip(&self.seen_counts) {
            if let Some(b) = route(id) {
                into[b].seen_ids.push(id);
                into[b].seen_counts.push(count);
            }
        }
    }

    /// The same rows and counters, each sorted by id.
    pub fn sorted(&self) -> PackedRows {
        let mut order: Vec<usize> = (0..self.ids.len()).collect();
        order.sort_unstable_by_key(|&k| self.ids[k]);
        let mut out = PackedRows::empty(self.dim, self.values.dtype(), self.slots.len());
        let dim = self.dim;
        for &k in &order {
            out.ids.push(self.ids[k]);
            out.values.extend_from(&self.values, k * dim..(k + 1) * dim);
            for (o, s) in out.slots.iter_mut().zip(&self.slots) {
                o.extend_from_slice(&s[k * dim..(k + 1) * dim]);
            }
            out.meta.push(self.meta[k]);
        }
        let mut seen: Vec<(u64, u32)> = self.seen_ids.iter().copied().zip(self.seen_counts.iter().copied()).collect();
        seen.sort_unstable();
        (out.seen_ids, out.seen_counts) = seen.into_iter().unzip();
        out
    }
}

impl Rows {
    /// A copy of the held rows, sorted by id, and of the admission counters, sorted by id (the
    /// slots evicted rows left free are not in it).
    pub fn packed(&self) -> PackedRows {
        let mut held: Vec<(u64, u32)> = self.index.iter().collect();
        held.sort_unstable();
        let dim = self.dim;
        let mut out = PackedRows::empty(dim, match self.values {
            Values::F32(_) => DType::F32,
            Values::Bf16(_) => DType::Bf16,
        }, self.slots.len());
        out.ids.reserve(held.len());
        out.meta.reserve(held.len());
        match (&mut out.values, &self.values) {
            (RowValues::F32(o), Values::F32(v)) => {
                o.reserve(held.len() * dim);
                held.iter().for_each(|&(_, s)| o.extend_from_slice(&v[s as usize * dim..(s as usize + 1) * dim]));
            }
            (RowValues::Bf16(o), Values::Bf16(v)) => {
                o.reserve(held.len() * dim);
                held.iter().for_each(|&(_, s)| o.extend_from_slice(&v[s as usize * dim..(s as usize + 1) * dim]));
            }
            _ => unreachable!("made with the same dtype"),
        }
        for (o, sl) in out.slots.iter_mut().zip(&self.slots) {
            o.reserve(held.len() * dim);
            held.iter().for_each(|&(_, s)| o.extend_from_slice(&sl[s as usize * dim..(s as usize + 1) * dim]));
        }
        for &(id, s) in &held {
            let m = self.meta[s as usize];
            debug_assert_eq!(m.id, id);
            out.ids.push(id);
            out.meta.push(RowState { tick: m.tick, updates: m.updates, steps: m.steps, step: m.step });
        }
        let mut seen: Vec<(u64, u32)> = self.seen.iter().map(|(&id, &n)| (id, n)).collect();
        seen.sort_unstable();
        (out.seen_ids, out.seen_counts) = seen.into_iter().unzip();
        out
    }

    /// The stripe's tick, last sweep and counters.
    pub fn stripe_state(&self) -> StripeState {
        StripeState { tick: self.tick, swept_at: self.swept_at, counts: self.counts }
    }

    /// Puts back rows, admission counters and state as a checkpoint packed them, into this
    /// empty stripe of `def`'s table. The rows are stored densely (the free slots evicted
    /// rows had left are not kept): no lookup and no later update can tell.
    pub fn restore(&mut self, def: &TableDef, rows: PackedRows, state: StripeState) -> Result<(), String> {
        if !self.index.is_empty() || !self.meta.is_empty() || !self.seen.is_empty() {
            return Err("restoring into a stripe that holds rows".into());
        }
        rows.check()?;
        if rows.dim != self.dim {
            return Err(format!("rows of {} elements, the table's have {}", rows.dim, self.dim));
        }
        if rows.values.dtype() != def.dtype {
            return Err(format!("{} rows, the table stores {}", rows.values.dtype().name(), def.dtype.name()));
        }
        if rows.slots.len() != self.slots.len() {
            return Err(format!("{} optimizer slots, {} keeps {}", rows.slots.len(), def.optimizer.name(), self.slots.len()));
        }
        let n = rows.ids.len();
        if n > u32::MAX as usize {
            return Err(format!("{n} rows in one stripe"));
        }
        let mut index = RowIndex::new(id_key());
        index.reserve(n);
        let mut meta = Vec::with_capacity(n);
        for (k, (&id, m)) in rows.ids.iter().zip(&rows.meta).enumerate() {
            if index.insert(id, k as u32).is_some() {
                return Err(format!("id {id} has two rows"));
            }
            meta.push(RowMeta { id, tick: m.tick, updates: m.updates, steps: m.steps, step: m.step });
        }
        let mut seen = IdMap::default();
        seen.reserve(rows.seen_ids.len());
        for (&id, &count) in rows.seen_ids.iter().zip(&rows.seen_counts) {
            if index.contains(id) {
                return Err(format!("id {id} has a row and an admission count"));
            }
            if seen.insert(id, count).is_some() {
                return Err(format!("id {id} has two admission counts"));
            }
        }
        self.values = match rows.values {
            RowValues::F32(v) => Values::F32(v),
            RowValues::Bf16(v) => Values::Bf16(v),
        };
        self.slots = rows.slots;
        self.index = index;
        self.meta = meta;
        self.free = Vec::new();
        self.seen = seen;
        self.tick = state.tick;
        self.swept_at = state.swept_at;
        self.counts = state.counts;
        Ok(())
    }

    /// Evicts by the table's policy until the stripe holds at most its capacity (rows restored
    /// onto fewer shards than wrote them may not fit); returns the rows evicted, which are
    /// counted as evicted. Without an eviction policy nothing goes: the stripe stays over its
    /// capacity and creates no row until it is below it.
    pub fn trim_to_capacity(&mut self, def: &TableDef) -> usize {
        if self.capacity == 0 || self.index.len() <= self.capacity {
            return 0;
        }
        let excess = self.index.len() - self.capacity;
        match def.eviction {
            Eviction::None => return 0,
            Eviction::Lru => self.evict_lowest(excess, |m| (0, m.tick, m.id)),
            Eviction::Lfu => self.evict_lowest(excess, |m| (m.updates as u64, m.tick, m.id)),
            Eviction::Ttl { .. } => self.evict_lowest(excess, |m| (m.step, m.tick, m.id)),
        }
        excess
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

    /// Updates within one push happen as if one after the other: a row updated earlier in
    /// the batch is not evicted before its update, and a new row's slot never carries
    /// another row's pending update (checked against a plain one-at-a-time loop).
    #[test]
    fn a_batch_that_evicts_gives_the_same_rows_as_one_update_at_a_time() {
        fn one_at_a_time(r: &mut Rows, d: &TableDef, ids: &[u64], grads: &[f32], step: u64) {
            r.tick += 1;
            let mut scratch = vec![0f32; r.dim];
            for (&id, g) in ids.iter().zip(grads.chunks_exact(r.dim)) {
                let held = r.index.get(id);
                let slot = match held {
                    Some(s) => s as usize,
                    None if !r.admit(d, id) => {
                        r.counts.dropped += 1;
                        continue;
                    }
                    None => match r.create(d, id, step) {
                        Some(s) => s,
                        None => {
                            r.counts.dropped += 1;
                            continue;
                        }
                    },
                };
                r.update(d, slot, g, 1.0, step, &mut scratch);
            }
        }
        for (eviction, evict_batch) in [(Eviction::Lru, 1), (Eviction::Lfu, 1), (Eviction::Lru, 2), (Eviction::Lfu, 3)] {
            let d = def(Admission::Always, eviction, 4);
            let (mut batched, mut single) = (Rows::new(&d, 4, evict_batch), Rows::new(&d, 4, evict_batch));
            let warm: &[u64] = &[1, 2, 3, 4];
            let batch: &[u64] = &[4, 1, 5, 6, 7, 101, 2];
            let grads: Vec<f32> = (0..batch.len() * 2).map(|i| i as f32 + 0.5).collect();
            batched.push(&d, warm, &[1.0; 8], 1.0, 0);
            one_at_a_time(&mut single, &d, warm, &[1.0; 8], 0);
            batched.push(&d, &[4], &[1.0; 2], 1.0, 1);
            one_at_a_time(&mut single, &d, &[4], &[1.0; 2], 1);
            batched.push(&d, batch, &grads, 1.0, 2);
            one_at_a_time(&mut single, &d, batch, &grads, 2);
            let what = format!("{eviction:?}, {evict_batch} at a time");
            assert_eq!(held(&batched), held(&single), "{what}");
            let ids = held(&batched);
            let (mut a, mut b) = (vec![0.0; ids.len() * 2], vec![0.0; ids.len() * 2]);
            batched.lookup(&d, &ids, &mut a);
            single.lookup(&d, &ids, &mut b);
            assert_eq!(a, b, "{what}");
            assert_eq!(batched.counts(), single.counts(), "{what}");
        }
    }

    #[test]
    fn a_shards_id_maps_are_keyed() {
        use std::hash::BuildHasher;
        let plain = std::hash::BuildHasherDefault::<parasync_proto::sparse::IdHasher>::default();
        let key = KeyedIds::default();
        assert!((0..64u64).filter(|&id| key.hash_one(id) == plain.hash_one(id)).count() < 2, "the process key changes every hash");
        assert_eq!(key.hash_one(9u64), KeyedIds::default().hash_one(9u64), "one key per process");
        assert_ne!(KeyedIds(1).hash_one(9u64), KeyedIds(2).hash_one(9u64));
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

    /// A table with Adam slots (per-row step counts), admission on the second update and a
    /// small LRU capacity, so that rows are evicted and slots left free.
    fn busy_def(dtype: DType) -> TableDef {
        TableDef {
            name: "t".into(),
            dim: 3,
            dtype,
            init: RowInit::Uniform { low: -0.5, high: 0.5, seed: 5 },
            optimizer: RowOptimizer::Adam { lr: 0.05, beta1: 0.9, beta2: 0.99, epsilon: 1e-6 },
            admission: Admission::MinCount(2),
            eviction: Eviction::Lru,
            capacity: 8,
        }
    }

    /// Step `step`'s pushes: ids and gradient rows that depend on both.
    fn busy_push(rows: &mut Rows, d: &TableDef, step: u64) {
        let ids: Vec<u64> = (0..5).map(|i| (step * 7 + i * i * 3) % 23).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let grads: Vec<f32> = (0..ids.len() * 3).map(|i| ((i as f32 + 1.3) * (step as f32 + 0.7)).sin() * 0.3).collect();
        rows.push(d, &ids, &grads, 0.05, step);
    }

    fn all_rows(rows: &Rows, d: &TableDef) -> Vec<u32> {
        let ids: Vec<u64> = (0..30).collect();
        let mut out = vec![0.0; ids.len() * 3];
        rows.lookup(d, &ids, &mut out);
        out.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn packed_rows_restore_to_the_same_lookups_and_the_same_later_updates() {
        for dtype in [DType::F32, DType::Bf16] {
            let d = busy_def(dtype);
            let mut r = Rows::new(&d, 8, 3);
            // Until a capture finds slots left free by evicted rows.
            let mut step = 0;
            while step < 20 || r.free.is_empty() {
                busy_push(&mut r, &d, step);
                step += 1;
                assert!(step < 500, "no free slots");
            }
            let c = r.counts();
            assert!(c.evicted > 0 && c.dropped > 0 && !r.seen.is_empty(), "{dtype:?}: {c:?}, {} waiting", r.seen.len());
            assert!(!r.free.is_empty(), "{dtype:?}: evicted rows left free slots");
            assert!(r.meta.iter().any(|m| m.steps > 1), "rows with their own Adam step counts");

            let packed = r.packed();
            assert!(packed.ids.windows(2).all(|w| w[0] < w[1]), "sorted by id");
            assert_eq!(packed.len(), r.len());
            let mut back = Rows::new(&d, 8, 3);
            back.restore(&d, packed.clone(), r.stripe_state()).unwrap();
            assert_eq!(back.packed(), packed, "{dtype:?}: the same rows, slots, bookkeeping and admission counts");
            assert_eq!(back.stripe_state(), r.stripe_state());
            assert_eq!(all_rows(&back, &d), all_rows(&r, &d), "{dtype:?}: the same lookups");

            // The same updates from here on give the same bits, evictions and admissions.
            for step in step..step + 30 {
                busy_push(&mut r, &d, step);
                busy_push(&mut back, &d, step);
                assert_eq!(all_rows(&back, &d), all_rows(&r, &d), "{dtype:?}: step {step}");
            }
            assert_eq!(back.counts(), r.counts());
            assert_eq!(back.packed(), r.packed());
        }
    }

    #[test]
    fn a_restore_refuses_rows_that_do_not_fit_the_table() {
        let d = busy_def(DType::F32);
        let mut r = Rows::new(&d, 8, 2);
        for step in 0..6 {
            busy_push(&mut r, &d, step);
        }
        let packed = r.packed();
        assert!(packed.len() >= 2);
        let err = |p: PackedRows, into: &mut Rows| into.restore(&d, p, StripeState::default()).unwrap_err();
        let mut twice = packed.clone();
        twice.ids[1] = twice.ids[0];
        assert!(err(twice, &mut Rows::new(&d, 8, 2)).contains("two rows"));
        let mut short = packed.clone();
        short.slots[1].pop();
        assert!(err(short, &mut Rows::new(&d, 8, 2)).contains("slot 1"));
        let bf = busy_def(DType::Bf16);
        assert!(Rows::new(&bf, 8, 2).restore(&bf, packed.clone(), StripeState::default()).unwrap_err().contains("f32 rows"));
        assert!(err(packed, &mut r).contains("holds rows"));
    }

    #[test]
    fn rows_past_the_capacity_are_trimmed_by_the_policy() {
        let mut d = def(Admission::Always, Eviction::Lru, 0);
        let mut big = Rows::new(&d, 0, 1);
        stream(&mut big, &d, &[&[1, 2], &[3], &[4, 5], &[1]]);
        d.capacity = 3;
        let mut r = Rows::new(&d, 3, 1);
        r.restore(&d, big.packed(), big.stripe_state()).unwrap();
        assert_eq!(r.trim_to_capacity(&d), 2);
        // 2 and 3 are the least recently updated.
        assert_eq!(held(&r), [1, 4, 5]);
        assert_eq!(r.counts().evicted, 2);
        let none = TableDef { eviction: Eviction::None, ..d.clone() };
        let mut kept = Rows::new(&none, 3, 1);
        kept.restore(&none, big.packed(), big.stripe_state()).unwrap();
        assert_eq!((kept.trim_to_capacity(&none), kept.len()), (0, 5), "without a policy nothing goes");
    }

    #[test]
    fn routing_packed_rows_keeps_each_row_whole() {
        let d = busy_def(DType::Bf16);
        let mut r = Rows::new(&d, 8, 2);
        for step in 0..12 {
            busy_push(&mut r, &d, step);
        }
        let packed = r.packed();
        let mut parts = vec![PackedRows::empty(3, DType::Bf16, 2); 2];
        packed.route_into(&mut parts, |id| Some((id % 2) as usize));
        assert!(parts.iter().all(|p| p.check().is_ok() && p.ids.iter().all(|id| (id % 2) as usize == (p.ids[0] % 2) as usize)));
        let mut joined = PackedRows::empty(3, DType::Bf16, 2);
        for p in &parts {
            p.route_into(std::slice::from_mut(&mut joined), |_| Some(0));
        }
        assert_eq!(joined.sorted(), packed);
    }
}
