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
}
