//! `parasync demo`: a local parameter-server job training a real model.
//!
//! The parent starts `--shards` real server processes and `--workers` real worker
//! processes (all of them this same binary), shows progress, then evaluates the trained
//! model on held-out data and reports accuracy, steps/s, bytes moved and the staleness
//! distribution. Workers report to the parent as JSON lines on their stdout.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parasync_client::{Client, ClientOptions, DType, Init, Optimizer, VariableSpec};
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::model::{digits::Dataset, mlp};

/// Consistency mode of the demo job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DemoMode {
    /// Synchronous steps: every worker's gradient averaged each step.
    Sync,
    /// Asynchronous: every gradient applied on arrival.
    Async,
    /// Bounded staleness.
    Bounded,
}

impl DemoMode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            DemoMode::Sync => "sync",
            DemoMode::Async => "async",
            DemoMode::Bounded => "bounded",
        }
    }
}

/// The model the demo trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DemoModel {
    /// A 64-128-10 MLP on the digits data (dense variables).
    Digits,
    /// Click-through prediction: a sparse embedding table and a dense head, on synthetic
    /// clicks from a planted model with Zipf-distributed categorical fields.
    Ctr,
}

/// Flags of `parasync demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// What to train.
    #[arg(long, value_enum, default_value = "digits")]
    pub model: DemoModel,
    /// --model ctr: steps per worker.
    #[arg(long, default_value_t = 1000)]
    pub ctr_steps: u64,
    /// --model ctr: examples per worker and step.
    #[arg(long, default_value_t = 256)]
    pub ctr_batch: usize,
    /// --model ctr: rows each shard's embedding table holds at most (least frequently
    /// updated rows are evicted past it; 0: no limit).
    #[arg(long, default_value_t = 3000)]
    pub ctr_capacity: u64,
    /// Consistency mode.
    #[arg(long, value_enum, default_value = "sync")]
    pub mode: DemoMode,
    /// Parameter-server shards (processes).
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Passes over the training data (all workers together).
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Mini-batch per worker and step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Learning rate (default: 0.1 × workers in sync mode, 0.1 otherwise).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Bounded mode: steps the fastest worker may run ahead of the slowest.
    #[arg(long, default_value_t = 2)]
    pub max_staleness: u64,
    /// Element type on the wire.
    #[arg(long, default_value = "f32")]
    pub wire: DType,
    /// Seed of the data split, the initial weights and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The digits data set (gzip CSV); by default the copy built into this program (from
    /// `data/digits.csv.gz`, CC BY 4.0).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Print one JSON object with the results instead of a report.
    #[arg(long)]
    pub json: bool,
    /// Show the servers' logs.
    #[arg(long)]
    pub server_logs: bool,
    /// The servers write checkpoints into this folder (`step-<n>/`, a safetensors file and
    /// a manifest per shard).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// With --checkpoint-dir: a checkpoint every this many steps.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every_steps: u64,
    /// With --checkpoint-dir: a checkpoint about every this many seconds instead (the
    /// shards agree on the step through the workers' pushes).
    #[arg(long)]
    pub checkpoint_every_s: Option<f64>,
    /// Kill a shard with SIGKILL once worker 0 reaches this step, and start it again at once
    /// with `--restore latest`: the workers carry on without restarting (checkpoints go to
    /// a temporary folder unless --checkpoint-dir is given). The report says how long the
    /// job took to step again.
    #[arg(long)]
    pub kill_shard_at: Option<u64>,
    /// The shard --kill-shard-at kills (default: the last).
    #[arg(long)]
    pub kill_shard: Option<usize>,
    /// Make the last worker a straggler: it takes this many milliseconds longer per step.
    #[arg(long, default_value_t = 0.0)]
    pub straggler_delay_ms: f64,
    /// The straggler's delay hits each of its steps with this probability (seeded; 1: every step).
    #[arg(long, default_value_t = 1.0)]
    pub straggler_probability: f64,
    /// Every worker gets the straggler's delay (each with its own random draws), not just
    /// the last: workers equally fast on average, each sometimes slow.
    #[arg(long)]
    pub delay_every_worker: bool,
    /// Worker 0 measures held-out accuracy every this many steps (the report's accuracy
    /// curve and time to 0.95); 0: only at the end.
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Sync mode: gradients a step waits for (k of n: the step completes with the first k
    /// workers' gradients and drops the others'); default: every worker's.
    #[arg(long)]
    pub replicas_to_aggregate: Option<u32>,
    /// Async and bounded mode: divide each gradient's learning rate by its staleness.
    #[arg(long)]
    pub lr_div_staleness: bool,
}

/// Flags of the hidden `parasync demo-worker` subcommand (one worker of the demo).
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// Comma-separated shard addresses.
    #[arg(long, value_delimiter = ',')]
    pub ps: Vec<String>,
    #[arg(long)]
    pub worker_id: u32,
    #[arg(long)]
    pub num_workers: usize,
    #[arg(long)]
    pub steps: u64,
    #[arg(long)]
    pub batch: usize,
    #[arg(long)]
    pub lr: f32,
    #[arg(long)]
    pub wire: DType,
    #[arg(long)]
    pub seed: u64,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Report progress every this many steps.
    #[arg(long, default_value_t = 10)]
    pub progress_every: u64,
    /// Extra milliseconds of compute per step (a straggler).
    #[arg(long, default_value_t = 0.0)]
    pub step_delay_ms: f64,
    /// The probability that a step takes the extra time.
    #[arg(long, default_value_t = 1.0)]
    pub step_delay_probability: f64,
    /// Measure held-out accuracy every this many steps (0: never).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
}

/// A worker's report line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum WorkerEvent {
    Progress { worker: u32, step: u64, loss: f32 },
    /// Held-out accuracy of the values the worker holds after `step` steps, `seconds` after
    /// it started.
    Eval { worker: u32, step: u64, seconds: f64, accuracy: f64 },
    /// `staleness` as (staleness, count) pairs: JSON maps cannot have integer keys.
    /// `compute_seconds`: gradients (and any straggler delay); `wait_seconds`: in push_pull.
    Done { worker: u32, steps: u64, seconds: f64, staleness: Vec<(u64, u64)>, dropped_stale: u64, compute_seconds: f64, wait_seconds: f64 },
}

/// One point of the accuracy curve.
#[derive(Clone, Debug, Serialize)]
pub struct AccuracyPoint {
    pub step: u64,
    pub seconds: f64,
    pub accuracy: f64,
}

/// What the demo reports (also its `--json` output).
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub mode: DemoMode,
    pub shards: usize,
    pub workers: usize,
    pub steps_per_worker: u64,
    pub train_rows: usize,
    pub test_rows: usize,
    pub test_accuracy: f64,
    pub wall_seconds: f64,
    /// Steps per second of one worker (mean over workers).
    pub steps_per_second: f64,
    pub bytes_pushed: u64,
    pub bytes_pulled: u64,
    /// Staleness of applied gradients → count, one per variable part a push updated (each
    /// variable keeps its own version); async and bounded, all zero in sync.
    pub staleness: BTreeMap<u64, u64>,
    pub dropped_stale: u64,
    /// Checkpoints written, over all shards (each shard's file counts once).
    pub checkpoints: u64,
    /// What --kill-shard-at did.
    pub kill: Option<KillReport>,
    /// Per worker: the share of its time spent waiting in push_pull (the rest computing).
    pub wait_fraction: Vec<f64>,
    /// Worker 0's held-out accuracy along the way (`--eval-every`).
    pub accuracy_curve: Vec<AccuracyPoint>,
    /// Seconds until worker 0 first measured a held-out accuracy of at least 0.95.
    pub seconds_to_095: Option<f64>,
}

/// A shard killed and restarted during the demo (`--kill-shard-at`).
#[derive(Debug, Serialize)]
pub struct KillReport {
    pub shard: usize,
    /// Worker 0's step when the shard was killed.
    pub at_step: u64,
    /// The step of the checkpoint the shard came back from (0: none; it started empty).
    pub restored_step: u64,
    /// From the SIGKILL until the new shard process announced its address (restore included).
    pub restart_seconds: f64,
    /// From the SIGKILL until a worker completed a step past every step completed before it.
    pub recovery_seconds: f64,
}

fn model_specs(init_seed: u64, lr: f32) -> Vec<VariableSpec> {
    let init = mlp::init_params(init_seed);
    mlp::parameter_specs()
        .into_iter()
        .zip(init)
        .map(|((name, shape), values)| VariableSpec {
            name,
            shape,
            dtype: DType::F32,
            optimizer: Optimizer::sgd(lr),
            init: Init::Values(values),
            stochastic_rounding: false,
        })
        .collect()
}

/// Passes worker `w`'s JSON event lines (its stdout) on to `tx`, from a thread of their own,
/// until the worker closes its stdout or nobody listens any more.
pub(crate) fn forward_events<E: serde::de::DeserializeOwned + Send + 'static>(
    out: std::process::ChildStdout,
    w: usize,
    tx: mpsc::Sender<anyhow::Result<E>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let ev = line
                .map_err(anyhow::Error::from)
                .and_then(|l| serde_json::from_str::<E>(&l).with_context(|| format!("worker {w} printed {l:?}")));
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
}

/// Kills the worker processes if the demo ends early (error or Ctrl-C).
pub(crate) struct Workers(pub(crate) Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once the demo received Ctrl-C or SIGTERM (its children are being stopped and the
/// process exits with status 130 shortly; errors seen meanwhile are consequences of that).
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Process ids of the demo's children, so an interrupt (Ctrl-C, SIGTERM) can stop them
/// before the demo exits: nothing is left running whichever way the demo ends.
#[derive(Clone, Default)]
pub(crate) struct ChildRegistry(std::sync::Arc<std::sync::Mutex<Vec<u32>>>);

impl ChildRegistry {
    pub(crate) fn add(&self, pid: u32) {
        if pid != 0 {
            self.0.lock().expect("child registry").push(pid);
        }
    }

    /// From now on, on SIGINT or SIGTERM: SIGTERM every child registered by then (servers
    /// drain, workers stop), then exit 130. (Children started later with
    /// `die_with_parent` go with the demo in any case.)
    pub(crate) fn kill_on_interrupt(&self) -> anyhow::Result<()> {
        let pids = self.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let signalled = {
            let _in_runtime = rt.enter();
            ps_server::server::shutdown_signal().context("installing the SIGINT / SIGTERM handlers")?
        };
        std::thread::spawn(move || {
            rt.block_on(signalled);
            INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
            eprintln!("interrupted: stopping the cluster");
            for &pid in pids.0.lock().expect("child registry").iter() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
            std::thread::sleep(Duration::from_millis(500));
            for &pid in pids.0.lock().expect("child registry").iter() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
            std::process::exit(130);
        });
        Ok(())
    }
}

/// Runs the demo job and returns its report (printing progress to stderr).
pub fn run(args: &DemoArgs, exe: &Path) -> anyhow::Result<DemoReport> {
    if args.shards == 0 || args.workers == 0 || args.batch == 0 || args.epochs == 0 {
        bail!("--shards, --workers, --batch and --epochs must be at least 1");
    }
    let data = Dataset::load_or_built_in(args.data.as_deref())?;
    let (train, test) = data.split(0.2, args.seed);
    let min_shard = train.len() / args.workers;
    if min_shard < args.batch {
        bail!("{} training rows over {} workers leave fewer than --batch {} rows each", train.len(), args.workers, args.batch);
    }
    // Every worker runs the same number of steps: one epoch is one pass of all workers.
    let steps = (args.epochs * (min_shard / args.batch)) as u64;
    let lr = args.lr.unwrap_or(match args.mode {
        DemoMode::Sync => 0.1 * args.workers as f32,
        _ => 0.1,
    });
    let quiet = args.json;
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    say(format!(
        "parasync demo: {} mode, {} shard(s), {} worker(s); 64-128-10 MLP on digits ({} train / {} test rows), {} steps per worker",
        args.mode.name(),
        args.shards,
        args.workers,
        train.len(),
        test.len(),
        steps
    ));

    let mut server_args = vec![
        "--mode".to_string(),
        args.mode.name().into(),
        "--num-workers".into(),
        args.workers.to_string(),
        "--max-staleness".into(),
        args.max_staleness.to_string(),
    ];
    server_args.extend(["--pull-timeout-ms".into(), "60000".into()]);
    if let Some(k) = args.replicas_to_aggregate {
        server_args.extend(["--replicas-to-aggregate".into(), k.to_string()]);
    }
    if args.lr_div_staleness {
        server_args.push("--lr-staleness-scaling".into());
    }
    let temp_checkpoints = match (&args.checkpoint_dir, args.kill_shard_at) {
        (None, Some(_)) => Some(TempFolder::new()?),
        _ => None,
    };
    if let Some(dir) = args.checkpoint_dir.as_ref().or(temp_checkpoints.as_ref().map(|t| &t.0)) {
        server_args.extend([
            "--num-shards".into(),
            args.shards.to_string(),
            "--checkpoint-dir".into(),
            dir.display().to_string(),
        ]);
        server_args.extend(match args.checkpoint_every_s {
            Some(s) => ["--checkpoint-every-s".into(), s.to_string()],
            None => ["--checkpoint-every-steps".into(), args.checkpoint_every_steps.to_string()],
        });
    }
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let mut opts = ClusterOptions::new(args.shards, &server_args);
    opts.show_logs = args.server_logs;
    let children = ChildRegistry::default();
    children.kill_on_interrupt()?;
    let mut cluster = LocalCluster::start(exe, &opts)?;
    for (i, s) in cluster.servers.iter().enumerate() {
        say(format!("  shard {i} listening on {}", s.addr));
    }
    for s in &cluster.servers {
        children.add(s.child.as_ref().map_or(0, |c| c.id()));
    }

    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<anyhow::Result<WorkerEvent>>();
    let mut workers = Workers(Vec::new());
    for w in 0..args.workers {
        let mut cmd = Command::new(exe);
        crate::cluster::die_with_parent(&mut cmd);
        let mut child = cmd
            .arg("demo-worker")
            .args(["--ps", &cluster.addrs().join(",")])
            .args(["--worker-id", &w.to_string(), "--num-workers", &args.workers.to_string()])
            .args(["--steps", &steps.to_string(), "--batch", &args.batch.to_string()])
            .args(["--lr", &lr.to_string(), "--wire", args.wire.name(), "--seed", &args.seed.to_string()])
            .args(args.data.iter().flat_map(|d| [std::ffi::OsStr::new("--data"), d.as_os_str()]))
            .args(["--progress-every", if args.kill_shard_at.is_some() { "1" } else { "10" }])
            .args(["--eval-every", &(if w == 0 { args.eval_every } else { 0 }).to_string()])
            .args(["--step-delay-ms", &(if w + 1 == args.workers || args.delay_every_worker { args.straggler_delay_ms } else { 0.0 }).to_string()])
            .args(["--step-delay-probability", &args.straggler_probability.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a worker")?;
        let out = child.stdout.take().expect("piped");
        children.add(child.id());
        workers.0.push(child);
        let tx = tx.clone();
        forward_events(out, w, tx);
    }
    drop(tx);

    let kill_shard = args.kill_shard.unwrap_or(args.shards - 1);
    if kill_shard >= args.shards {
        bail!("--kill-shard {kill_shard}: there are {} shards", args.shards);
    }
    let mut kill = KillState { at: args.kill_shard_at, killed: None, max_step: 0, report: None };
    let mut done = Vec::new();
    let mut curve = Vec::new();
    let mut last_progress = Instant::now();
    while done.len() < args.workers {
        let ev = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(ev) => ev?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                for (i, c) in workers.0.iter_mut().enumerate() {
                    if let Some(st) = c.try_wait()? {
                        if !st.success() {
                            bail!("worker {i} failed ({st})");
                        }
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("workers exited before reporting completion"),
        };
        match ev {
            WorkerEvent::Progress { worker, step, loss } => {
                kill.max_step_seen(step);
                if worker == 0 && kill.at.is_some_and(|at| step >= at) {
                    kill.at = None;
                    let t0 = Instant::now();
                    cluster.restart(kill_shard, &["--restore", "latest"])?;
                    children.add(cluster.servers[kill_shard].child.as_ref().map_or(0, |c| c.id()));
                    let restart_seconds = t0.elapsed().as_secs_f64();
                    let restored_step = crate::cluster::scrape(cluster.servers[kill_shard].metrics_addr.as_deref().unwrap_or_default())
                        .ok()
                        .and_then(|m| m.lines().find(|l| l.starts_with("parasync_restored_step{")).and_then(|l| l.rsplit(' ').next()?.parse().ok()))
                        .unwrap_or(0);
                    say(format!(
                        "  step {step:>5}: shard {kill_shard} killed (SIGKILL) and started again with --restore latest in {restart_seconds:.3} s (restored step {restored_step})"
                    ));
                    kill.killed = Some((t0, kill.max_step, step, restored_step, restart_seconds));
                }
                if let Some((t0, before, at_step, restored_step, restart_seconds)) = kill.killed {
                    if step > before {
                        let recovery_seconds = t0.elapsed().as_secs_f64();
                        say(format!("  step {step:>5}: training goes on, {recovery_seconds:.3} s after the SIGKILL"));
                        kill.report = Some(KillReport { shard: kill_shard, at_step, restored_step, restart_seconds, recovery_seconds });
                        kill.killed = None;
                    }
                }
                if worker == 0 && last_progress.elapsed() >= Duration::from_millis(500) {
                    last_progress = Instant::now();
                    say(format!("  step {step:>5}/{steps}  loss {loss:.4}  ({:.1} s)", started.elapsed().as_secs_f64()));
                }
            }
            WorkerEvent::Eval { step, seconds, accuracy, .. } => {
                curve.push(AccuracyPoint { step, seconds, accuracy });
            }
            done_ev @ WorkerEvent::Done { .. } => done.push(done_ev),
        }
    }
    for (i, c) in workers.0.iter_mut().enumerate() {
        let st = c.wait()?;
        if !st.success() {
            bail!("worker {i} exited with {st}");
        }
    }
    let wall = started.elapsed().as_secs_f64();

    // Evaluate what the servers hold.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let params = rt.block_on(async {
        let mut client = Client::connect(&cluster.addrs(), ClientOptions { worker_id: 0, ..Default::default() }).await?;
        client.register(model_specs(args.seed, lr)).await?;
        let final_step = if args.mode == DemoMode::Sync { steps } else { 0 };
        client.pull(final_step).await
    })?;
    // Closes the evaluation client's connections before the servers drain.
    drop(rt);
    let accuracy = mlp::accuracy(&params, &test);
    let bytes_pushed = cluster.metric_sum("parasync_bytes_in_total")? as u64;
    let bytes_pulled = cluster.metric_sum("parasync_bytes_out_total")? as u64;
    let checkpoints = cluster.metric_sum("parasync_checkpoints_total")? as u64;
    let statuses = cluster.terminate(Duration::from_secs(10))?;
    if let Some(bad) = statuses.iter().find(|s| !s.success()) {
        bail!("a server exited with {bad} on SIGTERM");
    }

    let mut staleness = BTreeMap::new();
    let mut dropped_stale = 0;
    let mut rate = 0.0;
    let mut wait_fraction = vec![0.0; args.workers];
    for ev in &done {
        if let WorkerEvent::Done { worker, staleness: s, dropped_stale: d, seconds, steps, compute_seconds, wait_seconds } = ev {
            wait_fraction[*worker as usize] = wait_seconds / (compute_seconds + wait_seconds).max(1e-12);
            for (k, v) in s {
                *staleness.entry(*k).or_insert(0) += v;
            }
            dropped_stale += d;
            rate += *steps as f64 / seconds.max(1e-9) / done.len() as f64;
        }
    }
    Ok(DemoReport {
        mode: args.mode,
        shards: args.shards,
        workers: args.workers,
        steps_per_worker: steps,
        train_rows: train.len(),
        test_rows: test.len(),
        test_accuracy: accuracy,
        wall_seconds: wall,
        steps_per_second: rate,
        bytes_pushed,
        bytes_pulled,
        staleness,
        dropped_stale,
        checkpoints,
        kill: kill.report,
        wait_fraction,
        seconds_to_095: curve.iter().find(|p| p.accuracy >= 0.95).map(|p| p.seconds),
        accuracy_curve: curve,
    })
}

/// Where `--kill-shard-at` stands.
struct KillState {
    /// The step still to kill at.
    at: Option<u64>,
    /// Since the kill, until a step past `max_step` completes: (when, max step then, worker
    /// 0's step then, restored step, restart seconds).
    killed: Option<(Instant, u64, u64, u64, f64)>,
    /// The highest step any worker reported.
    max_step: u64,
    report: Option<KillReport>,
}

impl KillState {
    fn max_step_seen(&mut self, step: u64) {
        if self.killed.is_none() {
            self.max_step = self.max_step.max(step);
        }
    }
}

/// A temporary folder, removed when dropped.
struct TempFolder(PathBuf);

impl TempFolder {
    fn new() -> anyhow::Result<TempFolder> {
        let d = std::env::temp_dir().join(format!("parasync-demo-checkpoints-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(TempFolder(d))
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Prints a finished report for people.
pub fn print_report(r: &DemoReport) {
    let total: u64 = r.staleness.values().sum();
    println!("done in {:.1} s", r.wall_seconds);
    println!("  held-out accuracy   {:.4} ({} test rows)", r.test_accuracy, r.test_rows);
    println!("  steps/s per worker  {:.1} ({} steps each, {} workers)", r.steps_per_second, r.steps_per_worker, r.workers);
    println!(
        "  bytes moved         {:.1} MB pushed, {:.1} MB pulled",
        r.bytes_pushed as f64 / 1e6,
        r.bytes_pulled as f64 / 1e6
    );
    let dist: Vec<String> = r
        .staleness
        .iter()
        .map(|(k, v)| format!("{k}: {:.1}%", 100.0 * *v as f64 / total.max(1) as f64))
        .collect();
    println!("  staleness           {} (of {total} variable updates)", dist.join(", "));
    println!("  dropped stale       {}", r.dropped_stale);
    if r.checkpoints > 0 {
        println!("  checkpoints         {} shard files written", r.checkpoints);
    }
    if let Some(k) = &r.kill {
        println!(
            "  shard {} killed     at step {}, back from step {} in {:.3} s; training went on {:.3} s after the SIGKILL",
            k.shard, k.at_step, k.restored_step, k.restart_seconds, k.recovery_seconds
        );
    }
    let waits: Vec<String> = r.wait_fraction.iter().map(|w| format!("{:.0}%", w * 100.0)).collect();
    println!("  waiting             {} of each worker's time (the rest computing)", waits.join(", "));
    if !r.accuracy_curve.is_empty() {
        match r.seconds_to_095 {
            Some(t) => println!("  reached 0.95        after {t:.2} s (worker 0's held-out accuracy, {} checks)", r.accuracy_curve.len()),
            None => println!("  reached 0.95        not within the run ({} checks)", r.accuracy_curve.len()),
        }
    }
}

/// One demo worker: pull, compute gradients on a mini-batch of its data shard, push.
pub fn run_worker(args: &WorkerArgs) -> anyhow::Result<()> {
    let data = Dataset::load_or_built_in(args.data.as_deref())?;
    let (train, test) = data.split(0.2, args.seed);
    let shard = train.shard(args.worker_id as usize, args.num_workers);
    let delay = Duration::from_secs_f64(args.step_delay_ms.max(0.0) / 1e3);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let opts = ClientOptions {
            worker_id: args.worker_id,
            wire_dtype: args.wire,
            pull_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let mut client = Client::connect(&args.ps, opts).await?;
        client.register(model_specs(args.seed, args.lr)).await?;
        let started = Instant::now();
        let mut staleness: BTreeMap<u64, u64> = BTreeMap::new();
        let mut dropped = 0u64;
        let (mut compute_seconds, mut wait_seconds) = (0.0, 0.0);
        let mut delay_draws = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(args.seed ^ 0x5742_4147_4c45_52 ^ (u64::from(args.worker_id) << 40));
        let mut batches = Vec::new().into_iter();
        let mut epoch = 0u64;
        // One round trip per step: each push returns the values for the next step.
        let mut params = client.pull(0).await?;
        for step in 0..args.steps {
            let idx = match batches.next() {
                Some(b) => b,
                None => {
                    let seed = args.seed ^ (u64::from(args.worker_id) << 32);
                    let mut all = mlp::epoch_batches(shard.len(), args.batch, seed, epoch);
                    all.retain(|b| b.len() == args.batch);
                    epoch += 1;
                    batches = all.into_iter();
                    batches.next().context("the data shard holds no full batch")?
                }
            };
            let computing = Instant::now();
            let (loss, grads) = mlp::loss_and_grads(&params, &shard.rows(&idx));
            if !delay.is_zero() && (args.step_delay_probability >= 1.0 || rand::Rng::gen::<f64>(&mut delay_draws) < args.step_delay_probability) {
                std::thread::sleep(delay);
            }
            let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            let waiting = Instant::now();
            compute_seconds += (waiting - computing).as_secs_f64();
            let summary = client.push_pull(step, &refs, &mut params).await?;
            wait_seconds += waiting.elapsed().as_secs_f64();
            if args.eval_every > 0 && (step + 1) % args.eval_every == 0 {
                let seconds = started.elapsed().as_secs_f64();
                emit(&WorkerEvent::Eval { worker: args.worker_id, step: step + 1, seconds, accuracy: mlp::accuracy(&params, &test) });
            }
            for s in summary.staleness {
                *staleness.entry(s).or_insert(0) += 1;
            }
            dropped += summary.dropped_stale as u64;
            if step % args.progress_every.max(1) == 0 || step + 1 == args.steps {
                emit(&WorkerEvent::Progress { worker: args.worker_id, step: step + 1, loss });
            }
        }
        emit(&WorkerEvent::Done {
            worker: args.worker_id,
            steps: args.steps,
            seconds: started.elapsed().as_secs_f64(),
            staleness: staleness.into_iter().collect(),
            dropped_stale: dropped,
            compute_seconds,
            wait_seconds,
        });
        anyhow::Ok(())
    })
}

fn emit(ev: &WorkerEvent) {
    println!("{}", serde_json::to_string(ev).expect("events serialise"));
}
