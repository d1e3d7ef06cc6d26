//! `parasync soak`: a long run of a local cluster under a mix of valid and bad traffic,
//! watching the shards (and this process, which hosts the workers) for leaks.
//!
//! Workers (tasks of this process, each with its own client) loop over a weighted mix:
//! push, pull, push-pull, registration (idempotent, or of a variable from a bounded pool),
//! bad requests sent as a third-party client would (each must get its own status code),
//! and connection drops (a client thrown away mid-run, a data-plane connection cut
//! mid-frame). Every `--report-every-s` seconds a line gives each process's resident
//! memory, open file descriptors and threads. The run fails if any valid request failed,
//! any bad request got another answer than its own, or a resource grew after warm-up: the
//! median of the last third of the samples above the highest sample of the first third
//! after warm-up, by more than a tolerance (RSS: 8 MiB + 10 %; descriptors: 32; threads: 8).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parasync_client::{Client, ClientOptions, Init, Optimizer, VariableSpec};
use parasync_proto::data::{put_frame, MAGIC};
use parasync_proto::ps::{self, parameter_server_client::ParameterServerClient};
use rand::{Rng, SeedableRng};
use tonic::Code;

use crate::cluster::{ClusterOptions, LocalCluster};

/// Flags of `parasync soak`.
#[derive(Clone, Debug, clap::Args)]
pub struct SoakArgs {
    /// How long to run, in minutes.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// How long to run, in seconds (instead of --minutes).
    #[arg(long, conflicts_with = "minutes")]
    pub seconds: Option<f64>,
    /// Worker clients (tasks of this process).
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Parameter-server shards (processes).
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// Seconds between two resource samples.
    #[arg(long, default_value_t = 10.0)]
    pub report_every_s: f64,
    /// Share of the run before the resources are expected to stay flat.
    #[arg(long, default_value_t = 0.2)]
    pub warmup_fraction: f64,
    /// Seed of the traffic mix.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// One process's resources at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) rss: u64,
    fds: u64,
    threads: u64,
}

pub(crate) fn sample(pid: u32) -> anyhow::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid} is gone"))?;
    let field = |name: &str| -> u64 {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    Ok(Sample { rss: field("VmRSS:") << 10, fds, threads: field("Threads:") })
}

/// What happened, by kind.
#[derive(Default)]
struct Tally {
    ok: BTreeMap<&'static str, AtomicU64>,
    /// Valid requests that failed, and bad requests answered with another code (the first
    /// few messages of each).
    failures: Mutex<Vec<String>>,
    failed: AtomicU64,
}

impl Tally {
    fn new() -> Tally {
        let kinds = ["push", "pull", "push_pull", "register", "bad_request", "reconnect", "cut_connection"];
        Tally { ok: kinds.into_iter().map(|k| (k, AtomicU64::new(0))).collect(), ..Default::default() }
    }

    fn count(&self, kind: &'static str) {
        self.ok[kind].fetch_add(1, Relaxed);
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Relaxed);
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() < 20 {
            f.push(what);
        }
    }
}

/// The model every worker trains: one variable split over the shards, two whole ones.
fn model() -> Vec<VariableSpec> {
    let mut specs = vec![VariableSpec::new("soak/w", &[256, 64]), VariableSpec::new("soak/b", &[64]), VariableSpec::new("soak/v", &[32, 32])];
    for s in &mut specs {
        s.optimizer = Optimizer::sgd(0.01);
        s.init = Init::Uniform { low: -0.1, high: 0.1, seed: 7 };
    }
    specs
}

fn client_options(worker: usize) -> ClientOptions {
    ClientOptions {
        worker_id: worker as u32,
        split_bytes: 32 << 10,
        connect_timeout: Duration::from_secs(20),
        pull_timeout: Some(Duration::from_secs(20)),
        recovery_timeout: Duration::ZERO,
        ..Default::default()
    }
}

/// `soak/raw` as a third-party client registers it, with `n` elements.
fn raw_variable(n: u64) -> ps::RegisterRequest {
    let sgd = ps::Optimizer { kind: Some(ps::optimizer::Kind::Sgd(ps::Sgd { learning_rate: 0.1, ..Default::default() })) };
    ps::RegisterRequest { name: "soak/raw".into(), shape: vec![n], storage_dtype: ps::Dtype::F32 as i32, optimizer: Some(sgd), ..Default::default() }
}

/// A bad request as a third-party gRPC client would send it, and the code it must get.
async fn bad_request(stub: &mut ParameterServerClient<tonic::transport::Channel>, which: usize) -> (&'static str, Code, Result<(), tonic::Status>) {
    let f32 = ps::Dtype::F32 as i32;
    let header = |variable: &str, n: u64| ps::PushHeader {
        variable: variable.into(),
        wire_dtype: f32,
        num_elements: n,
        kind: ps::PushKind::Gradient as i32,
        ..Default::default()
    };
    let push = |h: ps::PushHeader, v: &[f32]| {
        let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        futures::stream::iter(vec![ps::PushRequest { header: Some(h), data: data.into() }])
    };
    match which % 6 {
        0 => {
            let req = ps::PullRequest { variable: "soak/none".into(), wire_dtype: f32, timeout_ms: 1000, ..Default::default() };
            ("pull of an unknown variable", Code::NotFound, stub.pull(req).await.map(drop))
        }
        1 => ("push of the wrong length", Code::InvalidArgument, stub.push(push(header("soak/raw", 63), &[0.0; 63])).await.map(drop)),
        2 => ("push of a NaN", Code::InvalidArgument, stub.push(push(header("soak/raw", 64), &[f32::NAN; 64])).await.map(drop)),
        3 => {
            let long = ps::RegisterRequest { name: "n".repeat(300), ..raw_variable(4) };
            ("register of a 300-byte name", Code::InvalidArgument, stub.register(long).await.map(drop))
        }
        4 => ("register of another shape", Code::AlreadyExists, stub.register(raw_variable(65)).await.map(drop)),
        _ => (
            "an all-default set_learning_rate",
            Code::InvalidArgument,
            stub.set_learning_rate(ps::SetLearningRateRequest::default()).await.map(drop),
        ),
    }
}

/// Opens a data-plane connection, sends half a request and drops it.
async fn cut_connection(addr: &str) -> anyhow::Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = ps::DataRequest {
        op: Some(ps::data_request::Op::Pull(ps::PullRequest { variable: "soak/b".into(), ..Default::default() })),
        payload_bytes: 0,
    };
    let mut frame = MAGIC.to_vec();
    put_frame(&req, &mut frame);
    frame.truncate(frame.len() - 3);
    tokio::io::AsyncWriteExt::write_all(&mut s, &frame).await?;
    Ok(())
}

/// One worker's loop until `until`.
async fn worker(id: usize, addrs: Vec<String>, data_addrs: Vec<String>, until: Instant, seed: u64, tally: Arc<Tally>) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut c = Client::connect(&addrs, client_options(id)).await.context("connecting")?;
    c.register(model()).await.context("registering")?;
    let mut stub = ParameterServerClient::connect(format!("http://{}", addrs[0])).await.context("connecting the raw stub")?;
    // The variable the bad requests aim at, on the shard the stub talks to.
    stub.register(raw_variable(64)).await.context("registering soak/raw")?;
    let lens: Vec<usize> = model().iter().map(|s| s.len()).collect();
    let mut out: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
    let mut step = 0u64;
    while Instant::now() < until {
        let grads: Vec<Vec<f32>> = lens.iter().map(|&n| (0..n).map(|_| rng.gen_range(-1e-3..1e-3)).collect()).collect();
        let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let roll = rng.gen_range(0..100);
        let (kind, result): (&'static str, Result<(), String>) = match roll {
            0..30 => ("push", c.push(step, &refs).await.map(drop).map_err(|e| e.to_string())),
            30..55 => ("pull", c.pull(step).await.map(drop).map_err(|e| e.to_string())),
            55..80 => ("push_pull", c.push_pull(step, &refs, &mut out).await.map(drop).map_err(|e| e.to_string())),
            80..85 => {
                // The model again (idempotent), or a variable from a bounded pool.
                let mut specs = model();
                if rng.gen_bool(0.5) {
                    let mut extra = VariableSpec::new(&format!("soak/pool-{}", rng.gen_range(0..16)), &[128]);
                    extra.optimizer = Optimizer::sgd(0.01);
                    specs.push(extra);
                    let mut spare = Client::connect(&addrs, client_options(id)).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    let r = spare.register(specs).await.map_err(|e| e.to_string());
                    ("register", r)
                } else {
                    ("register", c.register(specs).await.map_err(|e| e.to_string()))
                }
            }
            85..95 => {
                let (what, want, got) = bad_request(&mut stub, rng.gen_range(0..6)).await;
                match got {
                    Err(s) if s.code() == want => ("bad_request", Ok(())),
                    Err(s) => ("bad_request", Err(format!("{what}: expected {want:?}, got {:?}: {}", s.code(), s.message()))),
                    Ok(()) => ("bad_request", Err(format!("{what}: expected {want:?}, got success"))),
                }
            }
            95..98 => {
                // Throw the client away (its connections close) and connect again.
                drop(c);
                c = Client::connect(&addrs, client_options(id)).await.map_err(|e| anyhow::anyhow!("reconnecting: {e}"))?;
                ("reconnect", c.register(model()).await.map_err(|e| e.to_string()))
            }
            _ => {
                let addr = &data_addrs[rng.gen_range(0..data_addrs.len())];
                ("cut_connection", cut_connection(addr).await.map_err(|e| e.to_string()))
            }
        };
        match result {
            Ok(()) => tally.count(kind),
            Err(e) => tally.fail(format!("worker {id}, {kind} at step {step}: {e}")),
        }
        step += 1;
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Whether the samples after warm-up grew: the median of the last third above the highest
/// of the first third by more than `tolerance(first)`. Returns the two values when so.
fn grew(series: &[u64], tolerance: impl Fn(u64) -> u64) -> Option<(u64, u64)> {
    if series.len() < 3 {
        return None;
    }
    let third = series.len() / 3;
    let first = *series[..third.max(1)].iter().max()?;
    let mut last = series[series.len() - third.max(1)..].to_vec();
    last.sort_unstable();
    let median = last[last.len() / 2];
    (median > first + tolerance(first)).then_some((first, median))
}

/// Runs the soak; returns an error (after the report) when it failed.
pub fn run(args: &SoakArgs, exe: &std::path::Path) -> anyhow::Result<()> {
    let total = Duration::from_secs_f64(args.seconds.unwrap_or(args.minutes * 60.0));
    if args.workers == 0 || args.shards == 0 || args.report_every_s <= 0.0 || !(0.0..1.0).contains(&args.warmup_fraction) {
        bail!("--workers and --shards must be at least 1, --report-every-s above 0, --warmup-fraction in [0, 1)");
    }
    let n = args.workers.to_string();
    let cluster = LocalCluster::start(exe, &ClusterOptions::new(args.shards, &["--mode", "async", "--num-workers", &n]))?;
    let pids: Vec<(String, u32)> = (0..args.shards)
        .filter_map(|s| cluster.pid(s).map(|p| (format!("shard {s}"), p)))
        .chain([("workers".to_string(), std::process::id())])
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let addrs = cluster.addrs();
    let data_addrs: Vec<String> = rt.block_on(async {
        let c = Client::connect(&addrs, client_options(0)).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = c.shard_info().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::Ok(info.into_iter().filter_map(|i| i.data_plane).collect())
    })?;
    if data_addrs.is_empty() {
        bail!("the shards offer no data plane");
    }
    println!(
        "# parasync soak: {} workers, {} shards (async), {:.0} s, a sample every {} s, warm-up {:.0} %",
        args.workers,
        args.shards,
        total.as_secs_f64(),
        args.report_every_s,
        args.warmup_fraction * 100.0
    );
    let tally = Arc::new(Tally::new());
    let started = Instant::now();
    let until = started + total;
    let tasks: Vec<_> = (0..args.workers)
        .map(|id| rt.spawn(worker(id, addrs.clone(), data_addrs.clone(), until, args.seed, Arc::clone(&tally))))
        .collect();
    let mut series: Vec<Vec<Sample>> = vec![Vec::new(); pids.len()];
    let mut times = Vec::new();
    let every = Duration::from_secs_f64(args.report_every_s);
    let mut next = started + every;
    while Instant::now() < until {
        std::thread::sleep(next.min(until).saturating_duration_since(Instant::now()).min(Duration::from_millis(200)));
        if Instant::now() < next {
            continue;
        }
        next += every;
        let t = started.elapsed().as_secs_f64();
        times.push(t);
        let mut line = format!("t={t:6.0}s");
        for (i, (name, pid)) in pids.iter().enumerate() {
            let s = sample(*pid)?;
            series[i].push(s);
            line.push_str(&format!("  {name}: rss {:.1} MiB fds {} threads {}", mib(s.rss), s.fds, s.threads));
        }
        let done: u64 = tally.ok.values().map(|v| v.load(Relaxed)).sum();
        line.push_str(&format!("  requests {done} failed {}", tally.failed.load(Relaxed)));
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
    for t in tasks {
        if let Err(e) = rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), t).await })
            .map_err(|_| anyhow::anyhow!("a worker did not stop within 60 s"))
            .and_then(|r| r.map_err(|e| anyhow::anyhow!("a worker panicked: {e}")))
            .and_then(|r| r)
        {
            tally.fail(format!("worker: {e:#}"));
        }
    }

    // The verdict.
    let mut problems: Vec<String> = tally.failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let skip = times.iter().take_while(|&&t| t < args.warmup_fraction * total.as_secs_f64()).count();
    for (i, (name, _)) in pids.iter().enumerate() {
        let after: Vec<Sample> = series[i].iter().skip(skip).copied().collect();
        let checks: [(&str, Vec<u64>, Box<dyn Fn(u64) -> u64>); 3] = [
            ("resident memory (bytes)", after.iter().map(|s| s.rss).collect(), Box::new(|v| (8 << 20) + v / 10)),
            ("open file descriptors", after.iter().map(|s| s.fds).collect(), Box::new(|_| 32)),
            ("threads", after.iter().map(|s| s.threads).collect(), Box::new(|_| 8)),
        ];
        for (what, values, tolerance) in checks {
            if let Some((first, last)) = grew(&values, tolerance) {
                problems.push(format!("{name}: {what} grew after warm-up, from at most {first} to a median of {last}"));
            }
        }
    }
    let counts: Vec<String> = tally.ok.iter().map(|(k, v)| format!("{k} {}", v.load(Relaxed))).collect();
    println!("# done in {:.0} s: {}; failed {}", started.elapsed().as_secs_f64(), counts.join(", "), tally.failed.load(Relaxed));
    drop(cluster);
    if problems.is_empty() {
        println!("# soak passed: no failed valid request, every bad request answered with its code, resources flat after warm-up");
        Ok(())
    } else {
        for p in &problems {
            println!("# FAILED: {p}");
        }
        bail!("the soak failed: {} problem(s), listed above", problems.len())
    }
}

#[cfg(test)]
mod tests {
    use super::grew;

    #[test]
    fn growth_is_judged_on_the_last_third_against_the_first() {
        let flat = [100, 104, 98, 101, 103, 99, 102, 100, 101];
        assert_eq!(grew(&flat, |_| 5), None);
        let leak = [100, 101, 102, 110, 120, 130, 140, 150, 160];
        assert_eq!(grew(&leak, |_| 5), Some((102, 150)));
        // One late spike is not growth.
        assert_eq!(grew(&[100, 100, 100, 100, 100, 100, 100, 100, 400], |_| 5), None);
        assert_eq!(grew(&[1, 1000], |_| 0), None, "too few samples to judge");
    }
}
