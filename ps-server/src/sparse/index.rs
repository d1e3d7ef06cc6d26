//! A stripe's index from id to row slot: open addressing with linear probing over one array
//! of 16-byte entries (id and slot side by side: one cache line per probe), at most three
//! quarters full. Unlike a `HashMap`, it lets a batch ask the CPU for the entries of ids a
//! few places ahead ([`RowIndex::prefetch`]), so that the index's cache misses overlap
//! instead of coming one after the other: in a large table they are most of a lookup's time.
//!
//! The probe starts at the top bits of SplitMix64's finaliser of the id xor this process's
//! secret key (ids come from the network: a fixed hash would let a client choose ids that
//! all collide). Removal shifts the entries behind back (no tombstones), so a table that
//! evicts and creates rows forever does not fill up with them.

use super::def::mix64;

/// An empty entry's slot.
const EMPTY: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
#[repr(C, align(16))]
struct Entry {
    id: u64,
    slot: u32,
}

const VACANT: Entry = Entry { id: 0, slot: EMPTY };

/// Ids to row slots (`0..u32::MAX - 1`).
#[derive(Clone, Debug)]
pub(crate) struct RowIndex {
    key: u64,
    entries: Vec<Entry>,
    len: usize,
    /// `64 - log2(entries.len())`.
    shift: u32,
}

impl RowIndex {
    /// An empty index hashing with `key`.
    pub fn new(key: u64) -> RowIndex {
        RowIndex { key, entries: Vec::new(), len: 0, shift: 64 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries allocated (for memory figures: 16 bytes each).
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    #[inline(always)]
    fn home(&self, id: u64) -> usize {
        // `shift` is 64 only while there are no entries (callers check that first).
        (mix64(id ^ self.key) >> self.shift) as usize
    }

    #[inline(always)]
    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// The slot of `id`'s row.
    #[inline]
    pub fn get(&self, id: u64) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let mut i = self.home(id);
        loop {
            let e = self.entries[i];
            if e.slot == EMPTY {
                return None;
            }
            if e.id == id {
                return Some(e.slot);
            }
            i = (i + 1) & self.mask();
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        self.get(id).is_some()
    }

    /// Asks the CPU to bring the entry where a search for `id` starts into its caches.
    #[inline(always)]
    pub fn prefetch(&self, id: u64) {
        if !self.entries.is_empty() {
            super::table::prefetch_bytes(self.entries.as_ptr().wrapping_add(self.home(id)).cast(), 16);
        }
    }

    /// Makes room for `additional` more ids without growing on the way.
    pub fn reserve(&mut self, additional: usize) {
        let needed = self.len + additional;
        if needed * 4 <= self.entries.len() * 3 {
            return;
        }
        let size = (needed * 4).div_ceil(3).next_power_of_two().max(16);
        let old = std::mem::replace(&mut self.entries, vec![VACANT; size]);
        self.shift = 64 - size.trailing_zeros();
        for e in old.into_iter().filter(|e| e.slot != EMPTY) {
            let mut i = self.home(e.id);
            while self.entries[i].slot != EMPTY {
                i = (i + 1) & self.mask();
            }
            self.entries[i] = e;
        }
    }

    /// Maps `id` to `slot`; returns the slot it had, if any.
    pub fn insert(&mut self, id: u64, slot: u32) -> Option<u32> {
        debug_assert_ne!(slot, EMPTY);
        self.reserve(1);
        let mut i = self.home(id);
        loop {
            let e = &mut self.entries[i];
            if e.slot == EMPTY {
                *e = Entry { id, slot };
                self.len += 1;
                return None;
            }
            if e.id == id {
                return Some(std::mem::replace(&mut e.slot, slot));
            }
            i = (i + 1) & self.mask();
        }
    }

    /// Unmaps `id`; returns its slot.
    pub fn remove(&mut self, id: u64) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(id);
        let slot = loop {
            let e = self.entries[i];
            if e.slot == EMPTY {
                return None;
            }
            if e.id == id {
                break e.slot;
            }
            i = (i + 1) & mask;
        };
        // Backward shift: move later entries of the run into the hole when their search
        // starts at or before it, so that every search still finds them.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e.slot == EMPTY {
                break;
            }
            let home = self.home(e.id);
            // Distance from home to j, and from the hole to j, around the ring.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole] = VACANT;
        self.len -= 1;
        Some(slot)
    }

    /// Every (id, slot), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.entries.iter().filter(|e| e.slot != EMPTY).map(|e| (e.id, e.slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Random inserts, overwrites and removals against a `HashMap`, with keys that crowd
    /// into few home entries (a small table wraps around its end often).
    #[test]
    fn agrees_with_a_hash_map_through_inserts_and_removals() {
        for key in [0u64, 0xdead_beef, u64::MAX] {
            let mut index = RowIndex::new(key);
            let mut model: HashMap<u64, u32> = HashMap::new();
            let mut state = 7u64;
            for round in 0..60_000u32 {
                state = mix64(state.wrapping_add(round as u64));
                let id = state % 3_000;
                match state >> 62 {
                    0 | 1 => assert_eq!(index.insert(id, round), model.insert(id, round)),
                    2 => assert_eq!(index.remove(id), model.remove(&id)),
                    _ => assert_eq!(index.get(id), model.get(&id).copied()),
                }
                assert_eq!(index.len(), model.len());
            }
            for id in 0..3_000 {
                assert_eq!(index.get(id), model.get(&id).copied(), "id {id}");
            }
            let mut all: Vec<(u64, u32)> = index.iter().collect();
            all.sort_unstable();
            let mut want: Vec<(u64, u32)> = model.into_iter().collect();
            want.sort_unstable();
            assert_eq!(all, want);
            // Emptied completely, every entry is vacant again.
            for (id, _) in all {
                index.remove(id);
            }
            assert!(index.is_empty() && index.iter().next().is_none());
        }
    }

    #[test]
    fn the_key_moves_where_ids_go() {
        let (a, b) = (RowIndex { shift: 48, ..RowIndex::new(1) }, RowIndex { shift: 48, ..RowIndex::new(2) });
        assert!((0..64u64).filter(|&id| a.home(id) == b.home(id)).count() < 4);
    }
}

