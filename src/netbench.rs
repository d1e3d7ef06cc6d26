//! `parasync bench bandwidth`: one training step's gradient exchange of real models over an
//! emulated network ([`crate::netlab`]) where the link, not the CPU, is the limit — for the
//! parameter server (every worker pushes its gradients and pulls the new values, sync mode,
//! shards on hosts of their own) and for ring allreduce (one rank per host) — beside the
//! textbook times of each scheme (BytePS, OSDI 2020): allreduce `2(N−1)M/(NB)`, a
//! non-colocated parameter server `max(M/B, NM/(kB))`, for M bytes of gradients, N workers,
//! k shards and links of B bytes/s.
//!
//! Every worker, rank and client is a thread of this process that has joined its host's
//! namespace (its sockets live there); the shards are `parasync server` processes on theirs.
//! Collectives between ranks of one process would copy through memory
//! (`process_vm_readv`), so peer copies are off: every byte crosses the emulated links.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parasync_client::{Client, ClientOptions, DType, Init, Optimizer, VariableSpec};
use parasync_collective::{Bf16, CommConfig, ConnectOptions, JoinSpec, ReduceOp, TcpOptions};
use serde::Serialize;

use crate::netlab::{self, LinkShape, NetLab};

/// The models' parameter shapes (torchvision resnet50 and vgg16, a BERT-base-sized encoder).
const MODEL_SHAPES: &str = include_str!("../data/model_shapes.json");

/// Arguments of `parasync bench bandwidth`.
#[derive(clap::Args, Debug, Clone)]
pub struct BandwidthArgs {
    /// Models, comma-separated: resnet50, vgg16, bert_base_like (from data/model_shapes.json),
    /// or synthetic:<size> (one tensor of that many bytes in f32, e.g. synthetic:64MiB).
    #[arg(long, default_value = "resnet50")]
    pub models: String,
    /// Worker counts N (ranks, for allreduce), comma-separated.
    #[arg(long, default_value = "2,4")]
    pub workers: String,
    /// Shard counts k of the parameter server, comma-separated.
    #[arg(long, default_value = "1,2")]
    pub shards: String,
    /// Link rates, comma-separated (1gbit, 10gbit, …).
    #[arg(long, default_value = "1gbit")]
    pub rates: String,
    /// Wire dtypes, comma-separated: f32, bf16.
    #[arg(long, default_value = "f32,bf16")]
    pub wires: String,
    /// Schemes, comma-separated: ps, allreduce.
    #[arg(long, default_value = "ps,allreduce")]
    pub schemes: String,
    /// Timed steps per configuration (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Write the table (Markdown) and the results (JSON lines) under this name
    /// (`PATH.md`, `PATH.jsonl`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Name of the emulated network (its namespaces are `<name>-sw`, `<name>-h<i>`).
    #[arg(long, default_value = "parasync-bw")]
    pub net_name: String,
}

/// One measured configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scheme: &'static str,
    pub model: String,
    /// Bytes of one step's gradients on the wire (M).
    pub bytes: u64,
    pub workers: usize,
    /// Shards (parameter server; 0 for allreduce).
    pub shards: usize,
    pub wire: &'static str,
    pub rate_bits: u64,
    /// Median seconds per step (the slowest worker's).
    pub seconds: f64,
    /// The scheme's textbook time on these links.
    pub formula_seconds: f64,
    /// `seconds / formula_seconds`.
    pub ratio: f64,
    /// Share of the busiest link's rate the step used (`formula_seconds / seconds`).
    pub link_fraction: f64,
}

fn list<T>(s: &str, what: &str, parse: impl Fn(&str) -> anyhow::Result<T>) -> anyhow::Result<Vec<T>> {
    let v: Vec<T> = s.split(',').map(|x| parse(x.trim()).with_context(|| format!("--{what}: {x:?}"))).collect::<anyhow::Result<_>>()?;
    if v.is_empty() {
        bail!("--{what} is empty");
    }
    Ok(v)
}

/// A model's tensors: name and element count.
fn model_tensors(name: &str) -> anyhow::Result<Vec<(String, usize)>> {
    if let Some(size) = name.strip_prefix("synthetic:") {
        let bytes = parasync_collective::bench::parse_size(size)?;
        if bytes < 4 {
            bail!("synthetic model {name:?}: at least 4 bytes");
        }
        return Ok(vec![("w".into(), bytes / 4)]);
    }
    let all: serde_json::Value = serde_json::from_str(MODEL_SHAPES).context("data/model_shapes.json")?;
    let models = &all["models"];
    let Some(list) = models.get(name).and_then(|m| m.as_array()) else {
        let known: Vec<&String> = models.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        bail!("unknown model {name:?}: one of {known:?}, or synthetic:<size>");
    };
    list.iter()
        .map(|p| {
            let n = p[0].as_str().context("a parameter's name")?.to_string();
            let dims = p[1].as_array().context("a parameter's shape")?;
            let count = dims.iter().map(|d| d.as_u64().map(|d| d as usize)).product::<Option<usize>>().context("a dimension")?;
            Ok((n, count))
        })
        .collect()
}

/// The textbook time of one step's exchange.
fn formula(scheme: &str, bytes: f64, n: usize, k: usize, rate_bits: u64) -> f64 {
    let b = rate_bits as f64 / 8.0;
    let n = n as f64;
    match scheme {
        "allreduce" => 2.0 * (n - 1.0) * bytes / (n * b),
        _ => (bytes / b).max(n * bytes / (k as f64 * b)),
    }
}

/// Runs the sweep, printing each row as it is measured.
pub fn run(args: &BandwidthArgs, exe: &Path) -> anyhow::Result<Vec<Row>> {
    let models = list(&args.models, "models", |m| Ok((m.to_string(), model_tensors(m)?)))?;
    let workers = list(&args.workers, "workers", |w| w.parse::<usize>().map_err(Into::into))?;
    let shards = list(&args.shards, "shards", |k| k.parse::<usize>().map_err(Into::into))?;
    let rates = list(&args.rates, "rates", netlab::parse_rate)?;
    let wires = list(&args.wires, "wires", |w| match w {
        "f32" => Ok("f32"),
        "bf16" => Ok("bf16"),
        _ => bail!("a wire dtype is f32 or bf16"),
    })?;
    let schemes = list(&args.schemes, "schemes", |s| match s {
        "ps" => Ok("ps"),
        "allreduce" => Ok("allreduce"),
        _ => bail!("a scheme is ps or allreduce"),
    })?;
    if workers.iter().chain(&shards).any(|&x| x == 0) || workers.iter().any(|&n| n < 2) {
        bail!("--workers needs at least 2 and --shards at least 1");
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let max_n = *workers.iter().max().unwrap();
    let max_k = if schemes.contains(&"ps") { *shards.iter().max().unwrap() } else { 0 };
    let mut out = Output::open(args.out.as_deref())?;
    let mut rows = Vec::new();
    for &rate in &rates {
        let lab = NetLab::up(&args.net_name, max_n + max_k, LinkShape { rate_bits: rate, delay: Duration::ZERO })?;
        eprintln!("# emulated network: {} hosts, links {}", lab.hosts.len(), lab.shape);
        for (model, tensors) in &models {
            for &wire in &wires {
                let elements: usize = tensors.iter().map(|t| t.1).sum();
                let bytes = (elements * if wire == "bf16" { 2 } else { 4 }) as u64;
                for &n in &workers {
                    for &scheme in &schemes {
                        let ks: &[usize] = if scheme == "ps" { &shards } else { &[0] };
                        for &k in ks {
                            let started = Instant::now();
                            let seconds = match scheme {
                                "ps" => ps_step(&lab, exe, tensors, n, k, max_n, wire, args.steps)?,
                                _ => allreduce_step(&lab, elements, n, wire, args.steps)?,
                            };
                            let f = formula(scheme, bytes as f64, n, k, rate);
                            let row = Row {
                                scheme,
                                model: model.clone(),
                                bytes,
                                workers: n,
                                shards: k,
                                wire,
                                rate_bits: rate,
                                seconds,
                                formula_seconds: f,
                                ratio: seconds / f,
                                link_fraction: f / seconds,
                            };
                            eprintln!(
                                "{:>9} {:<14} {:>5} N={} k={} {:>10}: {:8.1} ms a step, formula {:8.1} ms, ratio {:.2} ({:.1} s)",
                                scheme,
                                model,
                                wire,
                                n,
                                k,
                                lab.shape.to_string(),
                                seconds * 1e3,
                                f * 1e3,
                                row.ratio,
                                started.elapsed().as_secs_f64()
                            );
                            out.row(&row)?;
                            rows.push(row);
                        }
                    }
                }
            }
        }
        drop(lab);
    }
    out.finish(&rows)?;
    Ok(rows)
}

/// Median of the slowest rank's time per step of a ring allreduce of `elements` values.
fn allreduce_step(lab: &NetLab, elements: usize, n: usize, wire: &str, steps: usize) -> anyhow::Result<f64> {
    let master = format!("{}:29500", lab.hosts[0].addr);
    let token = format!("bw-{}", std::process::id());
    let mut threads = Vec::new();
    for rank in 0..n {
        let (netns, master, token, wire) = (lab.hosts[rank].netns.clone(), master.clone(), token.clone(), wire.to_string());
        threads.push(std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
            netlab::enter(&netns)?;
            let opts = ConnectOptions {
                spec: JoinSpec { rank, world_size: n, master, token, auth_token: None, tls: None, timeout: Duration::from_secs(60) },
                comm: CommConfig { timeout: Duration::from_secs(300), ..CommConfig::default() },
                tcp: TcpOptions { peer_copy: false, ..TcpOptions::default() },
                data_host: None,
            };
            let mut comm = parasync_collective::connect(&opts)?;
            if wire == "bf16" {
                timed_allreduces(&mut comm, &mut vec![Bf16::from_f32(1.0); elements], steps)
            } else {
                timed_allreduces(&mut comm, &mut vec![1.0f32; elements], steps)
            }
        }));
    }
    slowest_median(threads)
}

/// Times `steps` allreduces of `buf` (after one warm-up), each started together.
fn timed_allreduces<T: parasync_collective::Element>(comm: &mut parasync_collective::Communicator, buf: &mut [T], steps: usize) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for i in 0..=steps {
        comm.barrier()?;
        let t = Instant::now();
        comm.allreduce(buf, ReduceOp::Sum)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

/// Median over steps of the slowest thread's time.
fn slowest_median(threads: Vec<std::thread::JoinHandle<anyhow::Result<Vec<f64>>>>) -> anyhow::Result<f64> {
    let mut per: Vec<Vec<f64>> = Vec::new();
    for t in threads {
        per.push(t.join().map_err(|_| anyhow::anyhow!("a worker thread panicked"))??);
    }
    let steps = per[0].len();
    let mut slowest: Vec<f64> = (0..steps).map(|s| per.iter().map(|p| p[s]).fold(0.0, f64::max)).collect();
    slowest.sort_by(f64::total_cmp);
    Ok(slowest[steps / 2])
}

/// Kills the child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Median of the slowest worker's `push_pull` time: `k` shards (sync, `n` workers) on the
/// hosts after the first `first_shard_host`, `n` workers on the first hosts.
#[allow(clippy::too_many_arguments)]
fn ps_step(lab: &NetLab, exe: &Path, tensors: &[(String, usize)], n: usize, k: usize, first_shard_host: usize, wire: &str, steps: usize) -> anyhow::Result<f64> {
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for j in 0..k {
        let host = &lab.hosts[first_shard_host + j];
        let mut c = lab.command(first_shard_host + j, exe);
        c.args(["server", "--listen", &format!("{}:5000", host.addr), "--shard-index", &j.to_string()]);
        c.args(["--num-shards", &k.to_string(), "--mode", "sync", "--num-workers", &n.to_string()]);
        c.stdout(Stdio::piped()).stderr(Stdio::inherit()).env("RUST_LOG", "warn");
        let mut child = Killed(c.spawn().context("starting a shard")?);
        let stdout = child.0.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line.split_whitespace().nth(3).with_context(|| format!("shard {j} did not announce its address: {line:?}"))?;
        addrs.push(addr.to_string());
        servers.push(child);
    }
    let dtype = if wire == "bf16" { DType::Bf16 } else { DType::F32 };
    let specs: Vec<VariableSpec> = tensors
        .iter()
        .map(|(name, count)| {
            let mut s = VariableSpec::new(name, &[*count]);
            s.optimizer = Optimizer::sgd(0.0);
            s.init = Init::Zeros;
            s
        })
        .collect();
    let mut threads = Vec::new();
    for w in 0..n {
        let (netns, addrs, specs) = (lab.hosts[w].netns.clone(), addrs.clone(), specs.clone());
        threads.push(std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
            netlab::enter(&netns)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let opts = ClientOptions {
                    worker_id: w as u32,
                    wire_dtype: dtype,
                    pull_timeout: Some(Duration::from_secs(600)),
                    ..ClientOptions::default()
                };
                let mut c = Client::connect(&addrs, opts).await?;
                c.register(specs.clone()).await?;
                let grads: Vec<Vec<f32>> = specs.iter().map(|s| vec![1.0f32; s.shape.iter().product()]).collect();
                let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
                let mut out: Vec<Vec<f32>> = grads.clone();
                let mut times = Vec::new();
                for step in 0..=steps as u64 {
                    let t = Instant::now();
                    c.push_pull(step, &refs, &mut out).await?;
                    if step > 0 {
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
                Ok(times)
            })
        }));
    }
    let r = slowest_median(threads);
    drop(servers);
    r
}

/// Where the table and the JSON lines go.
struct Output {
    jsonl: Option<std::fs::File>,
    md: Option<PathBuf>,
}

impl Output {
    fn open(base: Option<&Path>) -> anyhow::Result<Output> {
        let Some(base) = base else { return Ok(Output { jsonl: None, md: None }) };
        if let Some(dir) = base.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let jsonl = base.with_extension("jsonl");
        let f = std::fs::File::create(&jsonl).with_context(|| format!("creating {}", jsonl.display()))?;
        Ok(Output { jsonl: Some(f), md: Some(base.with_extension("md")) })
    }

    fn row(&mut self, row: &Row) -> anyhow::Result<()> {
        if let Some(f) = &mut self.jsonl {
            writeln!(f, "{}", serde_json::to_string(row)?)?;
            f.flush()?;
        }
        Ok(())
    }

    fn finish(&mut self, rows: &[Row]) -> anyhow::Result<()> {
        let table = markdown(rows);
        print!("{table}");
        if let Some(md) = &self.md {
            std::fs::write(md, &table).with_context(|| format!("writing {}", md.display()))?;
            crate::svgplot::write_beside(md, plots(rows))?;
        }
        Ok(())
    }
}

/// One chart per model, wire dtype and link: step time against N, measured (solid) and the
/// formula (dashed), per scheme and shard count. Returns (file name part, SVG).
pub fn plots(rows: &[Row]) -> Vec<(String, String)> {
    use crate::svgplot::{line_chart, Series};
    let mut groups: Vec<(String, &'static str, u64)> = rows.iter().map(|r| (r.model.clone(), r.wire, r.rate_bits)).collect();
    groups.sort();
    groups.dedup();
    let mut out = Vec::new();
    for (model, wire, rate) in groups {
        let sel: Vec<&Row> = rows.iter().filter(|r| r.model == model && r.wire == wire && r.rate_bits == rate).collect();
        let mut keys: Vec<(&'static str, usize)> = sel.iter().map(|r| (r.scheme, r.shards)).collect();
        keys.sort();
        keys.dedup();
        let mut series = Vec::new();
        for (scheme, k) in keys {
            let label = if scheme == "ps" { format!("parameter server, {k} shard(s)") } else { "ring allreduce".to_string() };
            let pick = |f: fn(&Row) -> f64| -> Vec<(f64, f64)> {
                sel.iter().filter(|r| r.scheme == scheme && r.shards == k).map(|r| (r.workers as f64, f(r) * 1e3)).collect()
            };
            series.push(Series { label: format!("{label}: measured"), points: pick(|r| r.seconds), dashed: false });
            series.push(Series { label: format!("{label}: formula"), points: pick(|r| r.formula_seconds), dashed: true });
        }
        let shape = LinkShape { rate_bits: rate, delay: Duration::ZERO };
        let title = format!("{model}, {wire} on the wire, {shape} links: one step's exchange");
        let name: String = format!("{model}-{wire}-{shape}").chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
        out.push((name.replace("--", "-"), line_chart(&title, "workers N", "ms per step", &series)));
    }
    out
}

/// The results as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| scheme | model | M (MB) | wire | N | k | link | step (ms) | formula (ms) | ratio | link used |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.0} % |\n",
            r.scheme,
            r.model,
            r.bytes as f64 / 1e6,
            r.wire,
            r.workers,
            if r.scheme == "ps" { r.shards.to_string() } else { "–".into() },
            LinkShape { rate_bits: r.rate_bits, delay: Duration::ZERO },
            r.seconds * 1e3,
            r.formula_seconds * 1e3,
            r.ratio,
            r.link_fraction * 100.0
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_and_models() {
        // 100 MB at 1 Gbit/s (125 MB/s): allreduce N=4 sends 2·3/4 of it from each rank, 1.2 s.
        assert!((formula("allreduce", 1e8, 4, 0, 1_000_000_000) - 1.2).abs() < 1e-9);
        // PS N=4 over k=2 shards: each shard's link carries 4·M/2, 1.6 s; k=4: a worker's own M, 0.8 s.
        assert!((formula("ps", 1e8, 4, 2, 1_000_000_000) - 1.6).abs() < 1e-9);
        assert!((formula("ps", 1e8, 4, 8, 1_000_000_000) - 0.8).abs() < 1e-9);
        let r = model_tensors("resnet50").unwrap();
        assert_eq!(r.len(), 161);
        assert_eq!(r.iter().map(|t| t.1).sum::<usize>(), 25_557_032);
        assert_eq!(model_tensors("synthetic:4MiB").unwrap(), vec![("w".to_string(), 1 << 20)]);
        assert!(model_tensors("gpt9").unwrap_err().to_string().contains("resnet50"));
    }
}

/// `parasync bench …`: `bandwidth` over an emulated network (root), `staleness`.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCmd {
    /// One training step's gradient exchange of real models, parameter server and ring
    /// allreduce, f32 and bf16 on the wire, beside the schemes' textbook times.
    Bandwidth(BandwidthArgs),
    /// The demo's model under every consistency mode with randomly slow steps: time to 0.95
    /// accuracy, wait / compute split, staleness (loopback; no root needed).
    Staleness(crate::stalebench::StalenessArgs),
    /// Sparse tables: lookups and pushes beside dense pulls and pushes of the same bytes,
    /// memory per row, rows held and evictions along a long Zipf stream.
    Sparse(crate::sparsebench::SparseBenchArgs),
}

/// Runs `parasync bench …`.
pub fn run_cmd(cmd: &BenchCmd) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    match cmd {
        BenchCmd::Bandwidth(a) => run(a, &exe).map(|_| ()),
        BenchCmd::Staleness(a) => crate::stalebench::run(a, &exe).map(|_| ()),
        BenchCmd::Sparse(a) => crate::sparsebench::run(a, &exe),
    }
}
