//! Fuzzing of what a collective rank reads from the network: the data plane's frame
//! headers (random and mutated headers either decode to a header that encodes back to
//! itself, or are refused with a message) and the rendezvous's `Join` messages (decoded,
//! then checked against the job's table: accepted or refused with a message). Never a
//! panic. Seeded, so a failure reproduces; `PARASYNC_FUZZ_CASES` (default 10 000 per test)
//! runs longer.

use parasync_collective::frame::{FrameHeader, FrameKind, OpDesc, HEADER_LEN};
use parasync_collective::rendezvous::service::{resolve_addr, Table};
use parasync_collective::{DType, OpKind, ReduceOp};
use parasync_proto::collective::JoinRequest;

#[path = "common/seeded.rs"]
mod seeded;

use seeded::{cases, Rng};

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

/// Valid `Join` messages, encoded, to mutate.
fn join_seeds() -> Vec<Vec<u8>> {
    use prost::Message;
    [(1, 4, "127.0.0.1:4000"), (3, 4, "0.0.0.0:5000"), (2, 4, "[::1]:6000"), (0, 1, "10.0.0.1:1")]
        .into_iter()
        .map(|(rank, world, addr)| {
            JoinRequest { job_token: "job".into(), rank, world_size: world, data_addr: addr.into() }.encode_to_vec()
        })
        .collect()
}

#[test]
fn mutated_join_messages_are_decoded_and_accepted_or_refused() {
    use prost::Message;
    let seeds = join_seeds();
    let mut rng = Rng(0x10_1_4e55_a6e5);
    let from: std::net::SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let (mut joined, mut refused, mut undecodable) = (0, 0, 0);
    let mut table = Table::new("job".into(), 4);
    for i in 0..cases() {
        let seed = seeds[rng.below(seeds.len())].clone();
        let b = rng.mutate(seed);
        let Ok(req) = JoinRequest::decode(b.as_slice()) else {
            undecodable += 1;
            continue;
        };
        let outcome = resolve_addr(&req.data_addr, Some(from)).map_err(|s| s.message().to_string()).and_then(|addr| {
            table.join(&req.job_token, req.rank as usize, req.world_size as usize, addr).map_err(|r| format!("{r:?}"))
        });
        match outcome {
            Ok(()) => joined += 1,
            Err(why) => {
                assert!(!why.is_empty() && why.len() < 4096, "{b:02x?}: {why:?}");
                refused += 1;
            }
        }
        if i % 64 == 0 {
            table = Table::new("job".into(), 4); // room for more joins
        }
    }
    assert!(joined > 0 && refused > 0 && undecodable > 0, "{joined} joined, {refused} refused, {undecodable} undecodable");
}
