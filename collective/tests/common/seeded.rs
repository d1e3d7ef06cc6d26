//! Seeded randomness for the fuzz tests (this crate's and the workspace's): a small
//! generator, byte-string mutations, and the case count (`PARASYNC_FUZZ_CASES`, 10 000 by
//! default). Seeded, so a failure reproduces.
#![allow(dead_code)]

/// Cases per fuzz test: `PARASYNC_FUZZ_CASES`, else 10 000.
pub fn cases() -> usize {
    std::env::var("PARASYNC_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

/// xorshift64*: small, seeded, good enough to spread bytes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// `b` with one to four mutations: bit flips, random or boundary bytes, insertions,
    /// deletions, truncation, random tails.
    pub fn mutate(&mut self, mut b: Vec<u8>) -> Vec<u8> {
        for _ in 0..1 + self.below(4) {
            let at = self.below(b.len());
            match self.below(7) {
                0 if !b.is_empty() => b[at] ^= 1 << self.below(8),
                1 if !b.is_empty() => b[at] = self.next() as u8,
                2 if !b.is_empty() => b[at] = [0, 0xff, 0x7f, 0x80, 1][self.below(5)],
                3 => b.insert(self.below(b.len() + 1), self.next() as u8),
                4 if !b.is_empty() => {
                    b.remove(at);
                }
                5 => b.truncate(at),
                _ => b.extend((0..self.below(16)).map(|_| self.next() as u8)),
            }
        }
        b
    }
}
