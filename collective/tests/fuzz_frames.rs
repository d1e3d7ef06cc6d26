//! Fuzzing of the collective data plane's frame headers, the first bytes a peer's socket
//! delivers: random and mutated headers either decode to a header that encodes back to
//! itself, or are refused with a message; never a panic. Seeded, so a failure reproduces;
//! `PARASYNC_FUZZ_CASES` (default 10 000 per test) runs longer.

use parasync_collective::frame::{FrameHeader, FrameKind, OpDesc, HEADER_LEN};
use parasync_collective::{DType, OpKind, ReduceOp};

fn cases() -> usize {
    std::env::var("PARASYNC_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

/// xorshift64*: small, seeded, good enough to spread bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Valid headers of every kind, to mutate.
fn seeds() -> Vec<[u8; HEADER_LEN]> {
    let desc = OpDesc { seq: 7, kind: OpKind::AllReduce, dtype: DType::F32, reduce: Some(ReduceOp::Sum), count: 1024, root: 0 };
    [
        FrameKind::Data(desc.clone()),
        FrameKind::Remote(desc),
        FrameKind::Abort { seq: 3, culprit: Some(2) },
        FrameKind::Abort { seq: 3, culprit: None },
        FrameKind::Query { seq: 9 },
        FrameKind::Reply { seq: 9, waits_on: Some(1) },
        FrameKind::Copied { seq: 4 },
        FrameKind::Confirmed { seq: 4 },
    ]
    .into_iter()
    .map(|kind| FrameHeader { kind, payload_len: 4096 }.encode())
    .collect()
}

fn check(b: &[u8; HEADER_LEN]) -> bool {
    match FrameHeader::decode(b) {
        Ok(h) => {
            assert_eq!(FrameHeader::decode(&h.encode()).as_ref(), Ok(&h), "{b:02x?} does not round-trip");
            true
        }
        Err(msg) => {
            assert!(!msg.is_empty() && msg.len() < 512, "{b:02x?}: {msg:?}");
            false
        }
    }
}

#[test]
fn seeds_decode() {
    for s in seeds() {
        assert!(check(&s), "{s:02x?}");
    }
}

#[test]
fn mutated_headers_decode_or_are_refused() {
    let seeds = seeds();
    let mut rng = Rng(0x5eed_f00d_1234_5678);
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..cases() {
        let mut b = seeds[rng.below(seeds.len())];
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(HEADER_LEN);
            b[i] = match rng.below(3) {
                0 => b[i] ^ (1 << rng.below(8)),
                1 => rng.next() as u8,
                _ => [0, 0xff, 0x80, 1][rng.below(4)],
            };
        }
        if check(&b) {
            ok += 1;
        } else {
            refused += 1;
        }
    }
    assert!(ok > 0 && refused > 0, "the mutations should reach both outcomes: {ok} decoded, {refused} refused");
}

#[test]
fn random_headers_are_refused_or_decode() {
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    for i in 0..cases() {
        let mut b = [0u8; HEADER_LEN];
        for x in b.iter_mut() {
            *x = rng.next() as u8;
        }
        if i % 2 == 0 {
            b[..4].copy_from_slice(&seeds()[0][..4]); // past the magic, into the fields
        }
        check(&b);
    }
}
