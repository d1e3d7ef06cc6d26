//! `parasync bench sparse`: sparse tables against real shard processes.
//!
//! 1. **Throughput**: lookups and pushes of batches of Zipf(1.05) ids (`--batch`, default
//!    4096) for each row width, wire dtype and shard count, beside a dense pull and push of
//!    the same number of bytes (a `[batch, dim]` f32 tensor) in the same run, alternating.
//! 2. **Memory** (`--memory-rows N`): RSS of one shard holding N rows of `dim` 64 f32 with
//!    Adagrad, against the raw bytes of values and slots.
//! 3. **Stream** (`--stream-batches N`): rows held, admissions and evictions along a long
//!    Zipf stream at a fixed capacity, LRU and LFU.
//!
//! Prints Markdown tables (medians over `--rounds`; per-round figures beside them).

use std::time::{Duration, Instant};

use anyhow::Context;
use parasync_client::{Client, ClientOptions, DType, Eviction, Init, Optimizer, TableOptimizer, TableSpec, VariableSpec};

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::ctr::{zipf_cdf, zipf_draw, Rng};

/// Flags of `parasync bench sparse`.
#[derive(Clone, Debug, clap::Args)]
pub struct SparseBenchArgs {
    /// Shard counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub shards: Vec<usize>,
    /// Row widths.
    #[arg(long, value_delimiter = ',', default_value = "16,64,128")]
    pub dims: Vec<usize>,
    /// Wire dtypes.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub wires: Vec<DType>,
    /// Ids per lookup or push.
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Distinct ids the Zipf law draws from.
    #[arg(long, default_value_t = 1_000_000)]
    pub vocab: u64,
    /// Zipf exponent.
    #[arg(long, default_value_t = 1.05)]
    pub zipf: f64,
    /// Rounds (each measures every operation once, in alternating order).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per operation and round.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Skip the throughput tables.
    #[arg(long)]
    pub no_throughput: bool,
    /// Rows for the memory measurement (0: skip).
    #[arg(long, default_value_t = 0)]
    pub memory_rows: u64,
    /// Batches of the eviction stream (0: skip).
    #[arg(long, default_value_t = 0)]
    pub stream_batches: u64,
    /// Capacity (rows) of the eviction stream's table.
    #[arg(long, default_value_t = 100_000)]
    pub stream_capacity: u64,
    /// Distinct ids of the eviction stream.
    #[arg(long, default_value_t = 10_000_000)]
    pub stream_vocab: u64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Batches of Zipf ids (hashed, as real feature ids are).
fn batches(args: &SparseBenchArgs, count: usize, seed: u64) -> Vec<Vec<u64>> {
    let cdf = zipf_cdf(args.vocab, args.zipf);
    let mut rng = Rng::new(seed, 3);
    (0..count)
        .map(|_| (0..args.batch).map(|_| parasync_proto::sparse::mix64(zipf_draw(&cdf, &mut rng) ^ 0xb1d5)).collect())
        .collect()
}

/// Runs `$body` (an expression awaiting one call) for `$seconds` (at least three times);
/// evaluates to seconds per call.
macro_rules! per_call {
    ($seconds:expr, $i:ident => $body:expr) => {{
        let started = Instant::now();
        let mut $i = 0usize;
        while started.elapsed().as_secs_f64() < $seconds || $i < 3 {
            $body;
            $i += 1;
        }
        started.elapsed().as_secs_f64() / $i as f64
    }};
}

/// Runs the benchmark and prints its tables.
pub fn run(args: &SparseBenchArgs, exe: &std::path::Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!("# parasync bench sparse\n");
    println!(
        "batch {} ids, Zipf({}) over {} ids, {} rounds of {} s per operation; {}\n",
        args.batch,
        args.zipf,
        args.vocab,
        args.rounds,
        args.seconds,
        machine()
    );
    if !args.no_throughput {
        throughput(args, exe, &rt)?;
    }
    if args.memory_rows > 0 {
        memory(args, exe, &rt)?;
    }
    if args.stream_batches > 0 {
        stream(args, exe, &rt)?;
    }
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_default();
    format!("{cpus} CPUs ({model})")
}

fn options(wire: DType) -> ClientOptions {
    ClientOptions { wire_dtype: wire, pull_wire_dtype: Some(wire), pull_timeout: Some(Duration::from_secs(60)), ..Default::default() }
}

fn throughput(args: &SparseBenchArgs, exe: &std::path::Path, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    println!("## Throughput: sparse lookup / push beside dense pull / push of the same bytes\n");
    println!("Per call, median of {} rounds. MB/s counts the `[batch, dim]` f32 tensor the trainer gets or gives (4 bytes an element whatever the wire dtype); ratio = sparse MB/s ÷ dense MB/s.\n", args.rounds);
    println!("| shards | dim | wire | lookup µs | pull µs | lookup ratio | push_sparse µs | push µs | push ratio | unique ids / batch | lookup Mids/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let ids = batches(args, 64, 1);
    let unique: f64 = ids.iter().map(|b| b.iter().collect::<std::collections::HashSet<_>>().len() as f64).sum::<f64>() / ids.len() as f64;
    for &shards in &args.shards {
        let mut cluster = LocalCluster::start(exe, &ClusterOptions::new(shards, &["--mode", "async", "--num-workers", "1"]))?;
        for &dim in &args.dims {
            for &wire in &args.wires {
                let (lk, pl, ps, pd) = rt.block_on(async {
                    let mut c = Client::connect(&cluster.addrs(), options(wire)).await?;
                    let name = format!("t{dim}");
                    let mut t = TableSpec::new(&name, dim);
                    t.optimizer = TableOptimizer::Adagrad { lr: 0.01, initial_accumulator: 0.1, epsilon: 1e-8 };
                    c.register_table(&t).await?;
                    let mut v = VariableSpec::new(format!("d{dim}"), &[args.batch, dim]);
                    v.optimizer = Optimizer::Adagrad { lr: 0.01, initial_accumulator: 0.1, epsilon: 1e-8 };
                    v.init = Init::Zeros;
                    c.register(vec![v]).await?;
                    let grads = vec![0.001f32; args.batch * dim];
                    // Rows for the frequent ids exist before measuring.
                    for b in &ids {
                        c.push_sparse(&name, b, &grads, 0).await?;
                    }
                    let mut out = vec![0f32; args.batch * dim];
                    let mut dense = vec![vec![0f32; args.batch * dim]];
                    let c = &c;
                    let (mut lk, mut pl, mut ps, mut pd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                    for round in 0..args.rounds {
                        // Alternate which side goes first.
                        for sparse_first in [round % 2 == 0, round % 2 == 1] {
                            if sparse_first {
                                lk.push(per_call!(args.seconds, i => c.lookup(&name, &ids[i % ids.len()], 0, &mut out).await?));
                            } else {
                                pl.push(per_call!(args.seconds, _i => c.pull_into(0, &mut dense).await?));
                            }
                        }
                        for sparse_first in [round % 2 == 0, round % 2 == 1] {
                            if sparse_first {
                                ps.push(per_call!(args.seconds, i => c.push_sparse(&name, &ids[i % ids.len()], &grads, 0).await?));
                            } else {
                                pd.push(per_call!(args.seconds, _i => c.push(0, &[&grads]).await?));
                            }
                        }
                    }
                    anyhow::Ok((median(&mut lk), median(&mut pl), median(&mut ps), median(&mut pd)))
                })?;
                let us = |s: f64| s * 1e6;
                println!(
                    "| {shards} | {dim} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {unique:.0} | {:.2} |",
                    wire.name(),
                    us(lk),
                    us(pl),
                    pl / lk,
                    us(ps),
                    us(pd),
                    pd / ps,
                    args.batch as f64 / lk / 1e6
                );
            }
        }
        cluster.terminate(Duration::from_secs(10))?;
    }
    println!();
    Ok(())
}

fn memory(args: &SparseBenchArgs, exe: &std::path::Path, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    const DIM: usize = 64;
    const BATCH: u64 = 65_536;
    let n = args.memory_rows;
    println!("## Memory per row: {n} rows of dim {DIM}, f32, Adagrad, one shard\n");
    let mut cluster = LocalCluster::start(exe, &ClusterOptions::new(1, &["--mode", "async", "--num-workers", "1"]))?;
    let pid = cluster.pid(0).context("the shard's pid")?;
    let before = crate::soak::sample(pid)?.rss;
    let started = Instant::now();
    rt.block_on(async {
        let c = Client::connect(&cluster.addrs(), options(DType::F32)).await?;
        let mut t = TableSpec::new("mem", DIM);
        t.optimizer = TableOptimizer::Adagrad { lr: 0.01, initial_accumulator: 0.1, epsilon: 1e-8 };
        c.register_table(&t).await?;
        let grads = vec![0.001f32; BATCH as usize * DIM];
        let mut start = 0;
        while start < n {
            let end = (start + BATCH).min(n);
            let ids: Vec<u64> = (start..end).map(|i| parasync_proto::sparse::mix64(i ^ 0x3e3)).collect();
            c.push_sparse("mem", &ids, &grads[..ids.len() * DIM], 0).await?;
            start = end;
            if start % (BATCH * 16) == 0 {
                eprintln!("  {start} rows ({:.0} s)", started.elapsed().as_secs_f64());
            }
        }
        anyhow::Ok(())
    })?;
    let after = crate::soak::sample(pid)?.rss;
    let rows = cluster.metric_sum("parasync_table_rows")?;
    let allocated = cluster.metric_sum("parasync_table_bytes")?;
    let raw = (DIM * 4 * 2) as f64;
    println!("| rows | RSS before | RSS after | (after − before) / rows | raw values + slots per row | ratio | allocated by the table / rows | fill time |");
    println!("|---|---|---|---|---|---|---|---|");
    let per_row = (after - before) as f64 / rows;
    println!(
        "| {rows:.0} | {:.1} MiB | {:.1} MiB | {per_row:.1} B | {raw:.0} B | {:.3} | {:.1} B | {:.1} s |\n",
        before as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64,
        per_row / raw,
        allocated / rows,
        started.elapsed().as_secs_f64()
    );
    cluster.terminate(Duration::from_secs(30))?;
    Ok(())
}

fn stream(args: &SparseBenchArgs, exe: &std::path::Path, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    const DIM: usize = 16;
    println!(
        "## Eviction stream: {} batches of {} Zipf({}) ids over {} ids, capacity {} rows, dim {DIM}, one shard\n",
        args.stream_batches, args.batch, args.zipf, args.stream_vocab, args.stream_capacity
    );
    println!("| policy | batches | rows held | admitted | evicted | evicted per batch (last interval) |");
    println!("|---|---|---|---|---|---|");
    let cdf = zipf_cdf(args.stream_vocab, args.zipf);
    for (policy, eviction) in [("lru", Eviction::Lru), ("lfu", Eviction::Lfu)] {
        let mut cluster = LocalCluster::start(exe, &ClusterOptions::new(1, &["--mode", "async", "--num-workers", "1"]))?;
        rt.block_on(async {
            let c = Client::connect(&cluster.addrs(), options(DType::F32)).await?;
            let mut t = TableSpec::new("s", DIM);
            t.eviction = eviction;
            t.capacity = args.stream_capacity;
            c.register_table(&t).await?;
            let mut rng = Rng::new(5, 9);
            let grads = vec![0.001f32; args.batch * DIM];
            let every = (args.stream_batches / 10).max(1);
            let mut last_evicted = 0;
            for b in 1..=args.stream_batches {
                let ids: Vec<u64> = (0..args.batch).map(|_| parasync_proto::sparse::mix64(zipf_draw(&cdf, &mut rng))).collect();
                c.push_sparse("s", &ids, &grads, b).await?;
                if b % every == 0 {
                    let t = &c.shard_info().await?[0].tables[0];
                    println!(
                        "| {policy} | {b} | {} | {} | {} | {:.1} |",
                        t.rows,
                        t.admitted,
                        t.evicted,
                        (t.evicted - last_evicted) as f64 / every as f64
                    );
                    last_evicted = t.evicted;
                }
            }
            anyhow::Ok(())
        })?;
        cluster.terminate(Duration::from_secs(10))?;
    }
    println!();
    Ok(())
}
