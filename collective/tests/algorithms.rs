//! Tier 1: every algorithm, operation and dtype over the in-memory transport, for 1..=8
//! ranks running as threads, against an f64 reference.

use parasync_collective::transport::mem;
use parasync_collective::{Algorithm, Bf16, CommConfig, Communicator, Element, Error, ReduceOp};
use std::time::Duration;

/// Conversions between test values and element types.
trait TestElem: Element + std::fmt::Debug + PartialEq {
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn bits(self) -> u64;
    /// Allowed |got - reference| for a reduction of `n` values whose magnitudes sum to `abs_sum`.
    fn tolerance(reference: f64, abs_sum: f64, n: usize) -> f64;
}

impl TestElem for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
    fn tolerance(r: f64, s: f64, n: usize) -> f64 {
        (n as f64 + 1.0) * f32::EPSILON as f64 * (s + r.abs())
    }
}
impl TestElem for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn tolerance(r: f64, s: f64, n: usize) -> f64 {
        (n as f64 + 1.0) * f64::EPSILON * (s + r.abs())
    }
}
impl TestElem for Bf16 {
    fn from_f64(v: f64) -> Self {
        Bf16::from_f32(v as f32)
    }
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    fn bits(self) -> u64 {
        self.0 as u64
    }
    fn tolerance(r: f64, s: f64, n: usize) -> f64 {
        // Reduced in f32 (n roundings of 2^-24), then rounded once to bf16 (half ulp, 2^-8 relative).
        r.abs() * 2f64.powi(-8) + (n as f64 + 1.0) * f32::EPSILON as f64 * (s + r.abs())
    }
}
impl TestElem for i32 {
    fn from_f64(v: f64) -> Self {
        v as i32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn bits(self) -> u64 {
        self as u32 as u64
    }
    fn tolerance(_: f64, _: f64, _: usize) -> f64 {
        0.0
    }
}
impl TestElem for i64 {
    fn from_f64(v: f64) -> Self {
        v as i64
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn bits(self) -> u64 {
        self as u64
    }
    fn tolerance(_: f64, _: f64, _: usize) -> f64 {
        0.0
    }
}

/// Input of `rank` at element `i`: bf16-exact for quarter steps, inexact in f32 for floats.
fn input<T: TestElem>(rank: usize, i: usize, salt: usize) -> T {
    let k = rank * 7919 + i * 104_729 + salt * 31;
    let base = (k % 61) as f64 - 30.0;
    if T::DTYPE.name().starts_with('i') {
        T::from_f64(base)
    } else if T::DTYPE.name() == "bf16" {
        T::from_f64(base + 0.25 * (k % 4) as f64)
    } else {
        T::from_f64((base + 0.25 * (k % 4) as f64) * 0.1)
    }
}

fn reference<T: TestElem>(vals: &[T], op: ReduceOp) -> (f64, f64) {
    let xs: Vec<f64> = vals.iter().map(|v| v.to_f64()).collect();
    let abs: f64 = xs.iter().map(|x| x.abs()).sum();
    let n = xs.len() as f64;
    let r = match op {
        ReduceOp::Sum => xs.iter().sum(),
        ReduceOp::Avg if T::DTYPE.name().starts_with('i') => (xs.iter().sum::<f64>() / n).trunc(),
        ReduceOp::Avg => xs.iter().sum::<f64>() / n,
        ReduceOp::Min => xs.iter().cloned().fold(f64::INFINITY, f64::min),
        ReduceOp::Max => xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    };
    (r, abs)
}

fn assert_close<T: TestElem>(got: T, vals: &[T], op: ReduceOp, what: &str) {
    let (r, abs) = reference(vals, op);
    let tol = T::tolerance(r, abs, vals.len());
    assert!(
        (got.to_f64() - r).abs() <= tol,
        "{what}: got {got:?}, reference {r}, tolerance {tol}"
    );
}

/// Runs `f` on `n` ranks as threads over an in-memory network; returns their results.
fn on_ranks<R: Send>(
    n: usize,
    cfg: &CommConfig,
    f: impl Fn(&mut Communicator) -> R + Sync,
) -> Vec<R> {
    let transports = mem::network(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = transports
            .into_iter()
            .map(|t| {
                let f = &f;
                let cfg = cfg.clone();
                s.spawn(move || f(&mut Communicator::new(Box::new(t), cfg)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// Every op on one dtype, checked on every rank; returns each rank's allreduce result bits
/// (identical on every rank, and from run to run).
fn every_op<T: TestElem>(c: &mut Communicator, count: usize, salt: usize) -> Vec<u64> {
    let (me, n) = (c.rank(), c.world_size());
    let mut bits = Vec::new();
    for op in ReduceOp::ALL {
        let mut buf: Vec<T> = (0..count).map(|i| input(me, i, salt)).collect();
        c.allreduce(&mut buf, op).unwrap();
        for (i, got) in buf.iter().enumerate() {
            let vals: Vec<T> = (0..n).map(|r| input(r, i, salt)).collect();
            assert_close(
                *got,
                &vals,
                op,
                &format!("allreduce {op} {} n={n} count={count} i={i}", T::DTYPE),
            );
        }
        bits.extend(buf.iter().map(|v| v.bits()));
        // reduce_scatter: blocks of `count` elements out of n × count.
        let send: Vec<T> = (0..n * count).map(|i| input(me, i, salt + 1)).collect();
        let mut recv = vec![T::default(); count];
        c.reduce_scatter(&send, &mut recv, op).unwrap();
        for (i, got) in recv.iter().enumerate() {
            let vals: Vec<T> = (0..n).map(|r| input(r, me * count + i, salt + 1)).collect();
            assert_close(
                *got,
                &vals,
                op,
                &format!("reduce_scatter {op} {} n={n} count={count}", T::DTYPE),
            );
        }
    }
    for root in [0, n - 1] {
        let mut buf: Vec<T> = (0..count)
            .map(|i| {
                if me == root {
                    input(root, i, salt + 2)
                } else {
                    T::default()
                }
            })
            .collect();
        c.broadcast(&mut buf, root).unwrap();
        let want: Vec<T> = (0..count).map(|i| input(root, i, salt + 2)).collect();
        assert_eq!(
            buf,
            want,
            "broadcast root {root} {} n={n} count={count}",
            T::DTYPE
        );
    }
    let send: Vec<T> = (0..count).map(|i| input(me, i, salt + 3)).collect();
    let mut recv = vec![T::default(); n * count];
    c.allgather(&send, &mut recv).unwrap();
    let want: Vec<T> = (0..n)
        .flat_map(|r| (0..count).map(move |i| input::<T>(r, i, salt + 3)))
        .collect();
    assert_eq!(recv, want, "allgather {} n={n} count={count}", T::DTYPE);
    c.barrier().unwrap();
    bits
}

fn all_dtypes(c: &mut Communicator, count: usize) -> Vec<u64> {
    let mut bits = every_op::<f32>(c, count, 1);
    bits.extend(every_op::<Bf16>(c, count, 2));
    bits.extend(every_op::<f64>(c, count, 3));
    bits.extend(every_op::<i32>(c, count, 4));
    bits.extend(every_op::<i64>(c, count, 5));
    bits
}

fn config(algorithm: Algorithm) -> CommConfig {
    // Small chunks so that the ring pipelines several frames per segment even in tests.
    CommConfig {
        timeout: Duration::from_secs(20),
        chunk_bytes: 64,
        algorithm,
        ..CommConfig::default()
    }
}

#[test]
fn every_op_and_dtype_for_one_to_eight_ranks() {
    for n in 1..=8usize {
        let mut sizes = vec![0, 1, n.saturating_sub(1), n + 1, 13, 257];
        sizes.dedup();
        for algorithm in [Algorithm::Direct, Algorithm::Ring] {
            for &count in &sizes {
                let results = on_ranks(n, &config(algorithm), |c| all_dtypes(c, count));
                assert!(
                    results.windows(2).all(|w| w[0] == w[1]),
                    "n={n} {algorithm:?} count={count}: ranks differ bitwise"
                );
            }
        }
    }
}

#[test]
fn large_buffers_pipeline_through_the_ring() {
    for n in [2, 3, 5] {
        let cfg = CommConfig {
            chunk_bytes: 4096,
            ..config(Algorithm::Ring)
        };
        let results = on_ranks(n, &cfg, |c| {
            let mut bits = every_op::<f32>(c, 20_011, 7);
            bits.extend(every_op::<Bf16>(c, 20_011, 8));
            bits
        });
        assert!(
            results.windows(2).all(|w| w[0] == w[1]),
            "n={n}: ranks differ bitwise"
        );
    }
}

#[test]
fn auto_switches_algorithm_by_size_and_both_agree_with_reference() {
    let cfg = CommConfig {
        small_max_bytes: 2048,
        chunk_bytes: 512,
        ..config(Algorithm::Auto)
    };
    on_ranks(4, &cfg, |c| {
        every_op::<f32>(c, 100, 9); // 3 × 400 B <= 2048: direct
        every_op::<f32>(c, 1000, 9); // 3 × 4000 B: ring
    });
}

#[test]
fn results_are_bitwise_identical_from_run_to_run() {
    let cfg = CommConfig {
        chunk_bytes: 256,
        ..config(Algorithm::Ring)
    };
    let run = || on_ranks(5, &cfg, |c| every_op::<f32>(c, 3001, 11));
    let first = run();
    for _ in 0..3 {
        assert_eq!(run(), first);
    }
}

#[test]
fn fused_buckets_equal_unfused_results() {
    // Integer-valued f32 and i64 sums are exact in any order, so fused and unfused must
    // agree bitwise; the bucket boundaries change the algorithm's segmenting, not the values.
    let sizes = [1usize, 5, 300, 2, 4000, 17, 0, 64];
    let cfg = CommConfig {
        small_max_bytes: 2048,
        chunk_bytes: 256,
        ..config(Algorithm::Auto)
    };
    let results = on_ranks(3, &cfg, |c| {
        let me = c.rank();
        let make = |salt: usize| -> Vec<Vec<f32>> {
            sizes
                .iter()
                .map(|&s| {
                    (0..s)
                        .map(|i| ((me * 13 + i * 7 + salt) % 50) as f32)
                        .collect()
                })
                .collect()
        };
        let mut unfused = make(1);
        for t in unfused.iter_mut() {
            c.allreduce(t, ReduceOp::Sum).unwrap();
        }
        let mut fused = make(1);
        let mut views: Vec<&mut [f32]> = fused.iter_mut().map(|t| t.as_mut_slice()).collect();
        c.allreduce_fused(&mut views, ReduceOp::Sum, 1024).unwrap();
        assert_eq!(fused, unfused);
        let mut ints: Vec<Vec<i64>> = sizes
            .iter()
            .map(|&s| (0..s as i64).map(|i| i * (me as i64 + 1)).collect())
            .collect();
        let mut views: Vec<&mut [i64]> = ints.iter_mut().map(|t| t.as_mut_slice()).collect();
        c.allreduce_fused(&mut views, ReduceOp::Max, 100).unwrap();
        for (t, &s) in ints.iter().zip(&sizes) {
            assert_eq!(t, &(0..s as i64).map(|i| i * 3).collect::<Vec<_>>());
        }
        fused
    });
    assert!(results.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn fused_equals_unfused_bitwise_with_the_direct_algorithm() {
    // Direct folds every element in rank order whatever its position: bitwise equal even
    // for inexact float sums.
    let sizes = [3usize, 50, 1, 200];
    on_ranks(4, &config(Algorithm::Direct), |c| {
        let me = c.rank();
        let make = || -> Vec<Vec<f32>> {
            sizes
                .iter()
                .map(|&s| (0..s).map(|i| input::<f32>(me, i, s)).collect())
                .collect()
        };
        let mut unfused = make();
        for t in unfused.iter_mut() {
            c.allreduce(t, ReduceOp::Avg).unwrap();
        }
        let mut fused = make();
        let mut views: Vec<&mut [f32]> = fused.iter_mut().map(|t| t.as_mut_slice()).collect();
        c.allreduce_fused(&mut views, ReduceOp::Avg, 512).unwrap();
        let bits = |v: &Vec<Vec<f32>>| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fused), bits(&unfused));
    });
}

#[test]
fn mismatched_counts_or_dtypes_fail_on_every_rank_saying_what_differed() {
    for algorithm in [Algorithm::Direct, Algorithm::Ring] {
        let errors = on_ranks(4, &config(algorithm), |c| {
            let count = if c.rank() == 2 { 99 } else { 100 };
            let mut buf = vec![1.0f32; count];
            c.allreduce(&mut buf, ReduceOp::Sum).unwrap_err()
        });
        for (r, e) in errors.iter().enumerate() {
            let msg = e.to_string();
            assert!(
                msg.contains("element count (100 vs 99)")
                    || msg.contains("element count (99 vs 100)"),
                "rank {r}: {msg}"
            );
        }
        let errors = on_ranks(3, &config(algorithm), |c| {
            if c.rank() == 1 {
                let mut buf = vec![0f64; 10];
                c.allreduce(&mut buf, ReduceOp::Sum).unwrap_err()
            } else {
                let mut buf = vec![0f32; 10];
                c.allreduce(&mut buf, ReduceOp::Sum).unwrap_err()
            }
        });
        for e in &errors {
            assert!(e.to_string().contains("dtype (f"), "{e}");
        }
    }
}

#[test]
fn a_failed_communicator_is_poisoned() {
    let results = on_ranks(2, &config(Algorithm::Direct), |c| {
        let mut buf = vec![0i32; 1 + c.rank()];
        let first = c.allreduce(&mut buf, ReduceOp::Sum).is_err();
        let second = c.barrier().unwrap_err();
        (first, matches!(second, Error::Poisoned(_)))
    });
    assert!(results.iter().all(|&(a, b)| a && b));
}

#[test]
fn a_vanished_rank_is_named_by_every_other_rank() {
    let cfg = CommConfig {
        timeout: Duration::from_secs(5),
        ..config(Algorithm::Ring)
    };
    let results = on_ranks(4, &cfg, |c| {
        let mut buf = vec![1.0f32; 1000];
        c.allreduce(&mut buf, ReduceOp::Sum).unwrap();
        if c.rank() == 1 {
            return None; // drops nothing yet: the scope owns the communicator; see below
        }
        Some(())
    });
    assert_eq!(results.len(), 4);
    // A rank that leaves (its transport dropped) mid-job: the others name it.
    let transports = mem::network(3);
    let errors: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = transports
            .into_iter()
            .map(|t| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let mut c = Communicator::new(Box::new(t), cfg);
                    if c.rank() == 1 {
                        return None;
                    }
                    let mut buf = vec![1.0f32; 1000];
                    Some(c.allreduce(&mut buf, ReduceOp::Sum).unwrap_err())
                })
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(errors.len(), 2);
    for e in errors {
        assert_eq!(e.culprit(), Some(1), "{e}");
    }
}

#[test]
fn background_handles_overlap_and_return_results_in_order() {
    on_ranks(3, &config(Algorithm::Auto), |c| {
        let me = c.rank();
        let comm = std::mem::replace(
            c,
            Communicator::new(Box::new(mem::network(1).remove(0)), CommConfig::default()),
        );
        let bg = parasync_collective::BackgroundCommunicator::new(comm);
        let h1 = bg.allreduce(vec![me as f32; 1000], ReduceOp::Sum);
        let h2 = bg.allgather(vec![me as i64; 2]);
        let h3 = bg.broadcast(vec![me as f64; 5], 2);
        let h4 = bg.reduce_scatter(vec![1i32; 9], ReduceOp::Sum);
        assert_eq!(h1.wait().unwrap(), vec![3.0; 1000]);
        assert_eq!(h2.wait().unwrap(), vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(h3.wait().unwrap(), vec![2.0; 5]);
        assert_eq!(h4.wait().unwrap(), vec![3; 3]);
        bg.barrier().wait().unwrap();
        *c = bg.into_inner();
        assert_eq!(c.next_seq(), 5);
    });
}

#[test]
fn out_of_place_calls_equal_in_place_ones() {
    for algorithm in [Algorithm::Direct, Algorithm::Ring] {
        on_ranks(3, &config(algorithm), |c| {
            let me = c.rank();
            let send: Vec<f32> = (0..101).map(|i| input(me, i, 5)).collect();
            let mut recv = vec![0f32; 101];
            c.allreduce_into(&send, &mut recv, ReduceOp::Sum).unwrap();
            let mut inplace = send.clone();
            c.allreduce(&mut inplace, ReduceOp::Sum).unwrap();
            assert_eq!(recv, inplace);
            assert_eq!(
                send,
                (0..101).map(|i| input::<f32>(me, i, 5)).collect::<Vec<_>>(),
                "send untouched"
            );
            let mut gathered = vec![0i32; 3 * 4];
            gathered[me * 4..me * 4 + 4].copy_from_slice(&[me as i32; 4]);
            c.allgather_in_place(&mut gathered).unwrap();
            assert_eq!(gathered, (0..12).map(|j| j / 4).collect::<Vec<i32>>());
            assert!(matches!(
                c.allreduce_into(&send, &mut recv[..5], ReduceOp::Sum),
                Err(Error::InvalidArgument(_))
            ));
            assert!(matches!(
                c.broadcast(&mut recv, 3),
                Err(Error::InvalidArgument(_))
            ));
        });
    }
}
