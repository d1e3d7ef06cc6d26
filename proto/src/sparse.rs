//! Where a sparse table's row lives: every client (and any tool reading a table) computes
//! the same shard for an id.

/// SplitMix64's finaliser: a bijection whose outputs for nearby inputs look independent.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The shard (of `shards`) holding the row of `id`: `mix64(id) % shards`.
pub fn shard_of_id(id: u64, shards: usize) -> usize {
    (mix64(id) % shards.max(1) as u64) as usize
}

/// A hasher for ids: [`mix64`] of the id (std's default SipHash costs more than the rest
/// of a row's bookkeeping; ids are not attacker-chosen keys of a shared table here).
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix64(self.0 ^ b as u64);
        }
    }
    fn write_u64(&mut self, id: u64) {
        self.0 = mix64(id ^ self.0);
    }
}

impl IdHasher {
    /// A hasher whose hashes depend on `key` as well (see `IdHasher::default` for none): a
    /// server keys its maps with a secret drawn at start, so that nobody can send ids chosen
    /// to collide in them.
    pub fn keyed(key: u64) -> IdHasher {
        IdHasher(key)
    }
}

/// A `HashMap` keyed by ids, hashed with [`IdHasher`].
pub type IdMap<V> = std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Numbers a batch's ids in order of first appearance: the dedup every lookup and push
/// does (on the client before sending, on the shard to check what it got). An open-addressing
/// table of `u32` positions, probed linearly from the top bits of a keyed [`mix64`] of the id
/// (the low bits are what a client routes shards by): a 4096-id batch's table takes 32 KiB
/// and stays in the CPU's nearest cache, where a `HashMap` of ids takes four times that.
/// Reusable: the table is kept between batches.
#[derive(Clone, Debug, Default)]
pub struct UniqueIds {
    key: u64,
    /// 0: empty; `k + 1`: the `k`-th unique id.
    table: Vec<u32>,
}

impl UniqueIds {
    /// Hashes keyed by `key` (a shard draws a secret one: ids from the network must not be
    /// able to make every id collide).
    pub fn keyed(key: u64) -> UniqueIds {
        UniqueIds { key, table: Vec::new() }
    }

    /// Fills `unique` with the distinct ids of `ids` in order of first appearance and `at`
    /// with each position's index into `unique` (both cleared first).
    pub fn number(&mut self, ids: &[u64], unique: &mut Vec<u64>, at: &mut Vec<u32>) {
        unique.clear();
        at.clear();
        at.reserve(ids.len());
        assert!(ids.len() < u32::MAX as usize, "a batch of at most 2^32 - 2 ids");
        // At most half full: short probe runs.
        let bits = (ids.len().max(8) * 2).next_power_of_two().trailing_zeros();
        let size = 1usize << bits;
        self.table.clear();
        self.table.resize(size, 0);
        let mask = size - 1;
        let shift = 64 - bits;
        for &id in ids {
            let mut slot = (mix64(id ^ self.key) >> shift) as usize;
            let k = loop {
                match self.table[slot] {
                    0 => {
                        unique.push(id);
                        self.table[slot] = unique.len() as u32;
                        break unique.len() - 1;
                    }
                    e if unique[e as usize - 1] == id => break e as usize - 1,
                    _ => slot = (slot + 1) & mask,
                }
            };
            at.push(k as u32);
        }
    }

    /// Whether `ids` holds no id twice.
    pub fn all_distinct(&mut self, ids: &[u64]) -> bool {
        let (mut unique, mut at) = (Vec::new(), Vec::new());
        self.number(ids, &mut unique, &mut at);
        unique.len() == ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_spread_evenly_and_the_function_is_fixed() {
        let mut counts = [0usize; 4];
        for id in 0..40_000u64 {
            counts[shard_of_id(id, 4)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
        // Part of the wire contract: these must never change.
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
    }

    #[test]
    fn unique_ids_number_first_appearances_whatever_the_key() {
        for key in [0, 7, u64::MAX] {
            let mut u = UniqueIds::keyed(key);
            let (mut unique, mut at) = (Vec::new(), Vec::new());
            let ids = [5, 0, u64::MAX, 5, 9, 0, 0, 12];
            u.number(&ids, &mut unique, &mut at);
            assert_eq!(unique, [5, 0, u64::MAX, 9, 12]);
            assert_eq!(at, [0, 1, 2, 0, 3, 1, 1, 4]);
            assert!(!u.all_distinct(&ids));
            assert!(u.all_distinct(&unique));
            // Reused for a larger batch, with ids all on one shard of two (same low bit).
            let ids: Vec<u64> = (0..50_000u64).map(|i| (i / 3) * 2).collect();
            u.number(&ids, &mut unique, &mut at);
            assert_eq!(unique.len(), 16_667);
            assert!(at.iter().zip(&ids).all(|(&k, &id)| unique[k as usize] == id));
            u.number(&[], &mut unique, &mut at);
            assert!(unique.is_empty() && at.is_empty());
        }
    }
}
