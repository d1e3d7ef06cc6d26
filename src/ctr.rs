//! `parasync demo --model ctr`: click-through prediction with a sparse embedding table.
//!
//! Clicks are drawn from a planted model: four categorical fields whose values follow
//! Zipf(1.05) laws over vocabularies of 5 000, 2 000, 500 and 50 values, each value with
//! its own effect on the click logit, plus an interaction between the first two fields.
//! The trained model looks every field's value up in one sparse table (8 elements a row,
//! Adagrad, rows admitted on a value's second update, the least frequently updated rows
//! evicted when a shard's table is full) and feeds the concatenated rows to a dense
//! 32-32-1 head whose variables live on the same shards. Workers are real processes; the
//! parent measures the held-out AUC beside the AUC of the planted model itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parasync_client::{Admission, Client, ClientOptions, DType, Eviction, Init, Optimizer, RowInit, TableOptimizer, TableSpec, VariableSpec};
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::demo::{forward_events, ChildRegistry, DemoArgs, DemoMode, Workers};

/// Vocabulary of each field.
pub const VOCAB: [u64; 4] = [5000, 2000, 500, 50];
const FIELDS: usize = VOCAB.len();
/// Elements of an embedding row.
const DIM: usize = 8;
/// Units of the dense head's hidden layer.
const HIDDEN: usize = 32;
const INPUT: usize = FIELDS * DIM;
/// Zipf exponent of the field values.
const ZIPF: f64 = 1.05;
/// Rank of the interaction between fields 0 and 1 in the planted model.
const INTERACTION: usize = 4;
/// The planted model's bias (about 23 % clicks).
const BIAS: f32 = -1.4;
/// The embedding table.
const TABLE: &str = "ctr/embeddings";
/// Adam's learning rate for the dense head.
const HEAD_LR: f32 = 0.01;

/// SplitMix64: the generator of the planted model and the data streams (fixed here, so a
/// seed gives the same data on every machine and version).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        Rng(parasync_proto::sparse::mix64(seed ^ parasync_proto::sparse::mix64(stream.wrapping_add(0x5eed))))
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        parasync_proto::sparse::mix64(self.0)
    }
    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (1.0 - self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// The id a field's value (by frequency rank) has in the table: a hash, as real systems
/// hash feature strings.
pub fn id_of(field: usize, rank: u64) -> u64 {
    parasync_proto::sparse::mix64(((field as u64 + 1) << 40) | rank)
}

/// Click data from the planted model.
pub struct Planted {
    /// Per field, per rank: the value's effect on the logit.
    effect: Vec<Vec<f32>>,
    /// Per rank of fields 0 and 1: their interaction vectors.
    inter: [Vec<[f32; INTERACTION]>; 2],
    /// Per field: the cumulative Zipf distribution over ranks.
    cdf: Vec<Vec<f64>>,
}

/// One example: each field's value rank, the planted logit and the drawn click.
#[derive(Clone, Copy, Debug)]
pub struct Example {
    pub ranks: [u64; FIELDS],
    pub logit: f32,
    pub click: bool,
}

impl Planted {
    /// The planted model of `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed, 1);
        let effect = VOCAB.iter().map(|&n| (0..n).map(|_| (0.6 * rng.normal()) as f32).collect()).collect();
        let mut vectors = |n: u64| -> Vec<[f32; INTERACTION]> {
            (0..n).map(|_| std::array::from_fn(|_| (0.35 * rng.normal()) as f32)).collect()
        };
        let inter = [vectors(VOCAB[0]), vectors(VOCAB[1])];
        let cdf = VOCAB.iter().map(|&n| zipf_cdf(n, ZIPF)).collect();
        Planted { effect, inter, cdf }
    }

    /// The next example of `rng`'s stream.
    fn example(&self, rng: &mut Rng) -> Example {
        let ranks: [u64; FIELDS] = std::array::from_fn(|f| zipf_draw(&self.cdf[f], rng));
        let mut logit = BIAS;
        for f in 0..FIELDS {
            logit += self.effect[f][ranks[f] as usize];
        }
        let (a, b) = (&self.inter[0][ranks[0] as usize], &self.inter[1][ranks[1] as usize]);
        logit += a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let click = rng.unit() < sigmoid(logit) as f64;
        Example { ranks, logit, click }
    }

    /// `n` examples of stream `stream` (a worker's training data, the test set).
    pub fn examples(&self, seed: u64, stream: u64, n: usize) -> Vec<Example> {
        let mut rng = Rng::new(seed, stream);
        (0..n).map(|_| self.example(&mut rng)).collect()
    }
}

/// The cumulative distribution of Zipf(`s`) over ranks `0..n` (rank 0 the most frequent).
pub(crate) fn zipf_cdf(n: u64, s: f64) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-s)).collect();
    let total: f64 = w.iter().sum();
    w.iter()
        .scan(0.0, |acc, x| {
            *acc += x / total;
            Some(*acc)
        })
        .collect()
}

/// A rank drawn from `cdf` with `rng`.
pub(crate) fn zipf_draw(cdf: &[f64], rng: &mut Rng) -> u64 {
    let u = rng.unit();
    (cdf.partition_point(|&c| c < u) as u64).min(cdf.len() as u64 - 1)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Area under the ROC curve of `scores` for `labels` (ties count half).
pub fn auc(scores: &[f32], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties, then the Mann–Whitney statistic.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += order[i..=j].iter().filter(|&&k| labels[k]).count() as f64 * avg;
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return 0.5;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// The dense head: `x · w1 + b1` → ReLU → `· w2 + b2`.
struct Head<'a> {
    w1: &'a [f32],
    b1: &'a [f32],
    w2: &'a [f32],
    b2: f32,
}

impl Head<'_> {
    /// The logit of input `x`, leaving the hidden activations in `h`.
    fn forward(&self, x: &[f32], h: &mut [f32; HIDDEN]) -> f32 {
        h.copy_from_slice(self.b1);
        for (i, &xi) in x.iter().enumerate() {
            let row = &self.w1[i * HIDDEN..(i + 1) * HIDDEN];
            h.iter_mut().zip(row).for_each(|(a, &w)| *a += xi * w);
        }
        h.iter_mut().for_each(|a| *a = a.max(0.0));
        self.b2 + h.iter().zip(self.w2).map(|(a, w)| a * w).sum::<f32>()
    }
}

fn dense_specs(seed: u64, lr: f32) -> Vec<VariableSpec> {
    let mut rng = Rng::new(seed, 2);
    let mut values = |n: usize, scale: f64| -> Vec<f32> { (0..n).map(|_| (scale * rng.normal()) as f32).collect() };
    let he = |fan_in: usize| (2.0 / fan_in as f64).sqrt();
    let vars = [
        ("ctr/w1", vec![INPUT, HIDDEN], values(INPUT * HIDDEN, he(INPUT))),
        ("ctr/b1", vec![HIDDEN], vec![0.0; HIDDEN]),
        ("ctr/w2", vec![HIDDEN], values(HIDDEN, he(HIDDEN))),
        ("ctr/b2", vec![1], vec![BIAS]),
    ];
    vars.into_iter()
        .map(|(name, shape, v)| VariableSpec {
            name: name.into(),
            shape,
            dtype: DType::F32,
            optimizer: Optimizer::Adam { lr, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0 },
            init: Init::Values(v),
            stochastic_rounding: false,
        })
        .collect()
}

fn table_spec(seed: u64, capacity: u64) -> TableSpec {
    let mut t = TableSpec::new(TABLE, DIM);
    t.init = RowInit::Normal { mean: 0.0, stddev: 0.05, seed };
    t.optimizer = TableOptimizer::Adagrad { lr: 2.0, initial_accumulator: 0.1, epsilon: 1e-8 };
    t.admission = Admission::MinCount(2);
    if capacity > 0 {
        t.eviction = Eviction::Lfu;
        t.capacity = capacity;
    }
    t
}

/// Flags of the hidden `parasync demo-ctr-worker` subcommand (one worker of the CTR demo).
#[derive(Clone, Debug, clap::Args)]
pub struct CtrWorkerArgs {
    #[arg(long, value_delimiter = ',')]
    pub ps: Vec<String>,
    #[arg(long)]
    pub worker_id: u32,
    #[arg(long)]
    pub steps: u64,
    #[arg(long)]
    pub batch: usize,
    #[arg(long)]
    pub seed: u64,
    #[arg(long)]
    pub capacity: u64,
    #[arg(long)]
    pub wire: DType,
    /// Async: lookups and pulls do not wait for steps.
    #[arg(long)]
    pub no_step_wait: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Event {
    Progress { worker: u32, step: u64, loss: f32 },
    Done { worker: u32, steps: u64, seconds: f64 },
}

/// One CTR worker: lookup, pull, gradients, push, every step.
pub fn run_worker(args: &CtrWorkerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let opts = ClientOptions { worker_id: args.worker_id, wire_dtype: args.wire, pull_timeout: Some(Duration::from_secs(60)), ..Default::default() };
        let mut ps = Client::connect(&args.ps, opts).await?;
        ps.register(dense_specs(args.seed, HEAD_LR)).await?;
        ps.register_table(&table_spec(args.seed, args.capacity)).await?;
        let planted = Planted::new(args.seed);
        let mut rng = Rng::new(args.seed, 1000 + args.worker_id as u64);
        let started = Instant::now();
        let b = args.batch;
        let mut ids = vec![0u64; b * FIELDS];
        let mut rows = vec![0f32; b * FIELDS * DIM];
        let mut emb_grads = vec![0f32; b * FIELDS * DIM];
        let mut loss_avg = 0.0f32;
        for step in 0..args.steps {
            let batch: Vec<Example> = (0..b).map(|_| planted.example(&mut rng)).collect();
            for (e, chunk) in batch.iter().zip(ids.chunks_exact_mut(FIELDS)) {
                for f in 0..FIELDS {
                    chunk[f] = id_of(f, e.ranks[f]);
                }
            }
            let read_step = if args.no_step_wait { 0 } else { step };
            ps.lookup(TABLE, &ids, read_step, &mut rows).await?;
            let params = ps.pull(read_step).await?;
            let head = Head { w1: &params[0], b1: &params[1], w2: &params[2], b2: params[3][0] };
            let mut g: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
            let mut h = [0f32; HIDDEN];
            let mut loss = 0.0;
            for (k, e) in batch.iter().enumerate() {
                let x = &rows[k * INPUT..(k + 1) * INPUT];
                let logit = head.forward(x, &mut h);
                let p = sigmoid(logit);
                let y = if e.click { 1.0 } else { 0.0 };
                loss -= if e.click { p.max(1e-7).ln() } else { (1.0 - p).max(1e-7).ln() };
                let d = (p - y) / b as f32;
                g[3][0] += d;
                let mut dh = [0f32; HIDDEN];
                for j in 0..HIDDEN {
                    g[2][j] += d * h[j];
                    dh[j] = if h[j] > 0.0 { d * head.w2[j] } else { 0.0 };
                    g[1][j] += dh[j];
                }
                let dx = &mut emb_grads[k * INPUT..(k + 1) * INPUT];
                for (i, &xi) in x.iter().enumerate() {
                    let row = &head.w1[i * HIDDEN..(i + 1) * HIDDEN];
                    let gw = &mut g[0][i * HIDDEN..(i + 1) * HIDDEN];
                    let mut s = 0.0;
                    for j in 0..HIDDEN {
                        gw[j] += xi * dh[j];
                        s += row[j] * dh[j];
                    }
                    dx[i] = s;
                }
            }
            let grads: Vec<&[f32]> = g.iter().map(Vec::as_slice).collect();
            ps.push(step, &grads).await?;
            ps.push_sparse(TABLE, &ids, &emb_grads, step).await?;
            loss_avg = if step == 0 { loss / b as f32 } else { 0.9 * loss_avg + 0.1 * loss / b as f32 };
            if step % 10 == 9 || step + 1 == args.steps {
                emit(&Event::Progress { worker: args.worker_id, step: step + 1, loss: loss_avg });
            }
        }
        emit(&Event::Done { worker: args.worker_id, steps: args.steps, seconds: started.elapsed().as_secs_f64() });
        Ok(())
    })
}

fn emit(e: &Event) {
    println!("{}", serde_json::to_string(e).expect("serializable"));
}

/// What the CTR demo reports (its `--json` output).
#[derive(Debug, Serialize)]
pub struct CtrReport {
    pub model: &'static str,
    pub mode: DemoMode,
    pub shards: usize,
    pub workers: usize,
    pub steps_per_worker: u64,
    pub batch: usize,
    pub train_examples: u64,
    pub test_examples: usize,
    /// Held-out AUC of the trained model, and of the planted model's own logits.
    pub test_auc: f64,
    pub planted_auc: f64,
    /// Rows the shards hold at the end, and their capacity (rows per shard × shards).
    pub rows_held: u64,
    pub capacity: u64,
    pub admitted: u64,
    pub evicted: u64,
    /// Row updates dropped (values not admitted yet, or a full table).
    pub dropped_updates: u64,
    pub wall_seconds: f64,
    pub steps_per_second: f64,
}

/// Runs the CTR demo: a local cluster, `args.workers` worker processes, then the held-out
/// evaluation.
pub fn run(args: &DemoArgs, exe: &Path) -> anyhow::Result<CtrReport> {
    if args.shards == 0 || args.workers == 0 || args.ctr_batch == 0 || args.ctr_steps == 0 {
        bail!("--shards, --workers, --ctr-batch and --ctr-steps must be at least 1");
    }
    if args.mode == DemoMode::Bounded {
        bail!("--model ctr runs in sync or async mode");
    }
    let quiet = args.json;
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let steps = args.ctr_steps;
    let capacity = args.ctr_capacity;
    say(format!(
        "parasync demo --model ctr: {} mode, {} shard(s), {} worker(s); {} steps of {} examples per worker; \
         fields of {:?} values (Zipf {ZIPF}), {DIM}-element rows, capacity {} rows per shard (LFU)",
        args.mode.name(),
        args.shards,
        args.workers,
        steps,
        args.ctr_batch,
        VOCAB,
        capacity
    ));
    let server_args = ["--mode", args.mode.name(), "--num-workers", &args.workers.to_string(), "--pull-timeout-ms", "60000"];
    let mut opts = ClusterOptions::new(args.shards, &server_args);
    opts.show_logs = args.server_logs;
    let children = ChildRegistry::default();
    children.kill_on_interrupt()?;
    let mut cluster = LocalCluster::start(exe, &opts)?;
    for s in &cluster.servers {
        children.add(s.child.as_ref().map_or(0, |c| c.id()));
    }
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<anyhow::Result<Event>>();
    let mut workers = Workers(Vec::new());
    for w in 0..args.workers {
        let mut cmd = Command::new(exe);
        crate::cluster::die_with_parent(&mut cmd);
        cmd.arg("demo-ctr-worker")
            .args(["--ps", &cluster.addrs().join(",")])
            .args(["--worker-id", &w.to_string(), "--steps", &steps.to_string(), "--batch", &args.ctr_batch.to_string()])
            .args(["--seed", &args.seed.to_string(), "--capacity", &capacity.to_string(), "--wire", args.wire.name()]);
        if args.mode != DemoMode::Sync {
            cmd.arg("--no-step-wait");
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("starting a worker")?;
        let out = child.stdout.take().expect("piped");
        children.add(child.id());
        workers.0.push(child);
        let tx = tx.clone();
        forward_events(out, w, tx);
    }
    drop(tx);
    let mut rate = 0.0;
    let mut done = 0;
    let mut last_progress = Instant::now();
    while done < args.workers {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(ev) => match ev? {
                Event::Progress { worker, step, loss } => {
                    if worker == 0 && last_progress.elapsed() >= Duration::from_millis(500) {
                        last_progress = Instant::now();
                        say(format!("  step {step:>5}/{steps}  log loss {loss:.4}  ({:.1} s)", started.elapsed().as_secs_f64()));
                    }
                }
                Event::Done { steps, seconds, .. } => {
                    done += 1;
                    rate += steps as f64 / seconds.max(1e-9) / args.workers as f64;
                }
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {
                for (i, c) in workers.0.iter_mut().enumerate() {
                    if let Some(st) = c.try_wait()? {
                        if !st.success() {
                            bail!("worker {i} failed ({st})");
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("workers exited before reporting completion"),
        }
    }
    for (i, c) in workers.0.iter_mut().enumerate() {
        let st = c.wait()?;
        if !st.success() {
            bail!("worker {i} exited with {st}");
        }
    }
    let wall = started.elapsed().as_secs_f64();

    // Held-out evaluation of what the shards hold.
    let planted = Planted::new(args.seed);
    let test = planted.examples(args.seed, 7, 20_000);
    let labels: Vec<bool> = test.iter().map(|e| e.click).collect();
    let planted_auc = auc(&test.iter().map(|e| e.logit).collect::<Vec<_>>(), &labels);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (scores, infos) = rt.block_on(async {
        let mut c = Client::connect(&cluster.addrs(), ClientOptions::default()).await?;
        c.register(dense_specs(args.seed, HEAD_LR)).await?;
        c.register_table(&table_spec(args.seed, capacity)).await?;
        let final_step = if args.mode == DemoMode::Sync { steps } else { 0 };
        let params = c.pull(final_step).await?;
        let ids: Vec<u64> = test.iter().flat_map(|e| (0..FIELDS).map(move |f| id_of(f, e.ranks[f]))).collect();
        let mut rows = vec![0f32; ids.len() * DIM];
        for (i, r) in ids.chunks(8192).zip(rows.chunks_mut(8192 * DIM)) {
            c.lookup(TABLE, i, final_step, r).await?;
        }
        let head = Head { w1: &params[0], b1: &params[1], w2: &params[2], b2: params[3][0] };
        let mut h = [0f32; HIDDEN];
        let scores: Vec<f32> = rows.chunks_exact(INPUT).map(|x| head.forward(x, &mut h)).collect();
        let infos = c.shard_info().await?;
        anyhow::Ok((scores, infos))
    })?;
    drop(rt);
    let test_auc = auc(&scores, &labels);
    let tables = infos.iter().flat_map(|s| s.tables.iter().filter(|t| t.name == TABLE));
    let (mut rows_held, mut admitted, mut evicted, mut dropped) = (0, 0, 0, 0);
    for t in tables {
        rows_held += t.rows;
        admitted += t.admitted;
        evicted += t.evicted;
        dropped += t.dropped;
    }
    let statuses = cluster.terminate(Duration::from_secs(10))?;
    if let Some(bad) = statuses.iter().find(|s| !s.success()) {
        bail!("a server exited with {bad} on SIGTERM");
    }
    Ok(CtrReport {
        model: "ctr",
        mode: args.mode,
        shards: args.shards,
        workers: args.workers,
        steps_per_worker: steps,
        batch: args.ctr_batch,
        train_examples: steps * (args.ctr_batch * args.workers) as u64,
        test_examples: test.len(),
        test_auc,
        planted_auc,
        rows_held,
        capacity: capacity * args.shards as u64,
        admitted,
        evicted,
        dropped_updates: dropped,
        wall_seconds: wall,
        steps_per_second: rate,
    })
}

/// Prints the CTR report for people.
pub fn print_report(r: &CtrReport) {
    println!("model            click-through (sparse embeddings + 32-32-1 head), {} mode", r.mode.name());
    println!("cluster          {} shard(s), {} worker(s), {} steps of {} examples each", r.shards, r.workers, r.steps_per_worker, r.batch);
    println!("held-out AUC     {:.4}   (planted model: {:.4}; gap {:.4})", r.test_auc, r.planted_auc, r.planted_auc - r.test_auc);
    println!(
        "table rows       {} held (capacity {}), {} admitted, {} evicted, {} updates dropped before admission or when full",
        r.rows_held, r.capacity, r.admitted, r.evicted, r.dropped_updates
    );
    println!("speed            {:.1} steps/s per worker, {:.1} s wall", r.steps_per_second, r.wall_seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ties_half_and_orders_right() {
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]), 0.75);
        assert_eq!(auc(&[1.0, 1.0], &[true, false]), 0.5);
        assert_eq!(auc(&[0.0, 1.0], &[false, true]), 1.0);
    }

    #[test]
    fn planted_data_is_seeded_and_zipf_distributed() {
        let p = Planted::new(3);
        let a = p.examples(3, 9, 20_000);
        let b = p.examples(3, 9, 20_000);
        assert!(a.iter().zip(&b).all(|(x, y)| x.ranks == y.ranks && x.click == y.click));
        // Rank 0 of the largest field is the most frequent value, by far.
        let top = a.iter().filter(|e| e.ranks[0] == 0).count();
        let tenth = a.iter().filter(|e| e.ranks[0] == 9).count();
        assert!(top > 5 * tenth && tenth > 0, "{top} vs {tenth}");
        let clicks = a.iter().filter(|e| e.click).count() as f64 / a.len() as f64;
        assert!((0.1..0.45).contains(&clicks), "{clicks}");
        let labels: Vec<bool> = a.iter().map(|e| e.click).collect();
        let planted = auc(&a.iter().map(|e| e.logit).collect::<Vec<_>>(), &labels);
        assert!(planted > 0.7, "the planted logits separate clicks: {planted}");
    }
}
