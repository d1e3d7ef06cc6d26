//! Allreduce (sum) over real rank processes on 127.0.0.1, measured by criterion: N = 2 and 4
//! ranks, f32 and bf16, 4 KiB to 64 MiB per rank.
//!
//! `cargo bench --bench allreduce`. This process is rank 0 and runs criterion; ranks 1..N-1
//! are `parasync allreduce-follower` processes it starts (and kills if it fails). Before each
//! of criterion's batches rank 0 broadcasts the iteration count, size and dtype to them
//! (`parasync_collective::bench::led`); a batch's time is the slowest rank's.
//!
//! Throughput is bytes per rank per operation in GB/s (1e9 B/s): nccl-tests' algbw, as in
//! `parasync allreduce-bench`. busbw = algbw × 2(n−1)/n for n ranks (×1 at N=2, ×1.5 at N=4).
//!
//! Knobs (comma-separated lists):
//! - `PARASYNC_BENCH_RANKS`: rank counts, default `2,4`;
//! - `PARASYNC_BENCH_SIZES`: bytes per rank (B, KiB, MiB, GiB), default `4KiB,64KiB,1MiB,16MiB,64MiB`;
//! - `PARASYNC_BENCH_DTYPES`: element types, default `f32,bf16`;
//! - `PARASYNC_BENCH_FLAGS`: `allreduce-bench` tuning flags for every rank, space-separated
//!   (`--spin`, `--algorithm ring`, `--streams 2`…); they also name the group.
//!
//! Sizes from 16 MiB up take 10 samples (one operation lasts tens of milliseconds). The full
//! set is 20 benchmarks of criterion's 3 s warm-up + 5 s measurement: about 4 minutes on the
//! 2-core VM. A short run:
//! `PARASYNC_BENCH_SIZES=4KiB,1MiB cargo bench --bench allreduce -- --warm-up-time 1 --measurement-time 2`.

use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parasync_collective::bench::led::{Batch, Leader};
use parasync_collective::bench::parse_size;
use parasync_collective::DType;

/// The hidden `parasync` subcommand that runs a follower rank.
const FOLLOWER: &str = "allreduce-follower";
/// From this size per rank on, 10 samples instead of criterion's default.
const BIG: usize = 16 << 20;

fn env_list<T>(name: &str, default: &str, parse: impl Fn(&str) -> anyhow::Result<T>) -> Vec<T> {
    let list = std::env::var(name).unwrap_or_else(|_| default.to_string());
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| parse(s).unwrap_or_else(|e| panic!("{name}={list:?}: {e:#}")))
        .collect()
}

fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

fn bench(c: &mut Criterion) {
    let exe = Path::new(env!("CARGO_BIN_EXE_parasync"));
    let ranks = env_list("PARASYNC_BENCH_RANKS", "2,4", |s| Ok(s.parse::<usize>()?));
    let mut sizes = env_list(
        "PARASYNC_BENCH_SIZES",
        "4KiB,64KiB,1MiB,16MiB,64MiB",
        parse_size,
    );
    // Ascending, so that the smaller sample size of the big ones does not carry over.
    sizes.sort_unstable();
    sizes.dedup();
    let dtypes = env_list("PARASYNC_BENCH_DTYPES", "f32,bf16", |s| {
        s.parse::<DType>().map_err(anyhow::Error::msg)
    });
    let flags: Vec<String> = std::env::var("PARASYNC_BENCH_FLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let setup: String = flags
        .iter()
        .map(|f| format!("_{}", f.trim_start_matches('-')))
        .collect();

    for n in ranks {
        // Started by the first benchmark that runs (none for a filtered-out group).
        let mut leader: Option<Leader> = None;
        let mut g = c.benchmark_group(format!("allreduce_N{n}{setup}"));
        for &size in &sizes {
            if size >= BIG {
                g.sample_size(10);
            }
            for &dtype in &dtypes {
                let bytes = size / dtype.size() * dtype.size();
                g.throughput(Throughput::BytesDecimal(bytes as u64));
                g.bench_function(BenchmarkId::new(dtype.name(), size_label(size)), |b| {
                    let leader = leader.get_or_insert_with(|| {
                        Leader::launch(exe, FOLLOWER, n, &flags)
                            .unwrap_or_else(|e| panic!("starting {n} ranks: {e:#}"))
                    });
                    b.iter_custom(|iters| {
                        leader
                            .time(Batch {
                                iters,
                                bytes,
                                dtype,
                            })
                            .unwrap_or_else(|e| {
                                panic!("allreduce of {bytes} B {dtype} over {n} ranks: {e}")
                            })
                    });
                });
            }
        }
        g.finish();
        if let Some(leader) = leader {
            leader
                .finish()
                .unwrap_or_else(|e| panic!("stopping the followers of N={n}: {e:#}"));
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
