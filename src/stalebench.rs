//! `parasync bench staleness`: the digits MLP trained by the demo job (real shard and worker
//! processes) under every consistency mode with randomly slow steps, for what bounded
//! staleness buys: time to 0.95 held-out accuracy, accuracy after a fixed number of steps,
//! each worker's wait / compute split and the staleness of applied gradients, as a table and
//! two plots (accuracy against wall time per mode; wait fraction against the bound S).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::svgplot::{line_chart, Series};

/// Arguments of `parasync bench staleness`.
#[derive(clap::Args, Debug, Clone)]
pub struct StalenessArgs {
    /// Workers.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Shards.
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// Extra milliseconds a slow step takes.
    #[arg(long, default_value_t = 10.0)]
    pub delay_ms: f64,
    /// Probability that a step is slow (each worker draws its own).
    #[arg(long, default_value_t = 0.2)]
    pub probability: f64,
    /// Only the last worker has slow steps (a straggler); by default every worker does.
    #[arg(long)]
    pub straggler_only: bool,
    /// Bounds S of bounded mode, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16")]
    pub staleness: String,
    /// Worker 0 measures held-out accuracy every this many steps.
    #[arg(long, default_value_t = 10)]
    pub eval_every: u64,
    /// Passes over the training data (sets the steps: 330 at 30 with 4 workers).
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Write the table (`PATH.md`), the results (`PATH.jsonl`) and the plots (`PATH-*.svg`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One configuration's results.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub config: String,
    pub mode: String,
    /// Bounded mode's S (sync counts as 0).
    pub bound: Option<u64>,
    pub seconds_to_095: Option<f64>,
    pub final_accuracy: f64,
    pub wall_seconds: f64,
    pub steps_per_worker: u64,
    /// Mean over workers of the share of time spent waiting in push_pull.
    pub wait_fraction: f64,
    pub mean_staleness: f64,
    pub max_staleness: u64,
    /// Worker 0's (seconds, accuracy) along the way.
    pub curve: Vec<(f64, f64)>,
}

/// Runs every configuration, printing each as it finishes.
pub fn run(args: &StalenessArgs, exe: &Path) -> anyhow::Result<Vec<Row>> {
    let bounds: Vec<u64> = args
        .staleness
        .split(',')
        .map(|s| s.trim().parse().with_context(|| format!("--staleness: {s:?} is not a number")))
        .collect::<anyhow::Result<_>>()?;
    if args.workers < 2 {
        bail!("--workers needs at least 2");
    }
    let k = (args.workers - 1).to_string();
    let mut configs: Vec<(String, &str, Option<u64>, Vec<String>)> = vec![("sync".into(), "sync", Some(0), vec![])];
    configs.push((format!("sync, {k} of {}", args.workers), "sync", None, vec!["--replicas-to-aggregate".into(), k]));
    for &b in &bounds {
        configs.push((format!("bounded, S={b}"), "bounded", Some(b), vec!["--max-staleness".into(), b.to_string()]));
    }
    configs.push(("async".into(), "async", None, vec![]));
    configs.push(("async, lr ÷ staleness".into(), "async", None, vec!["--lr-div-staleness".into()]));
    let mut rows = Vec::new();
    for (i, (config, mode, bound, extra)) in configs.iter().enumerate() {
        let mut c = Command::new(exe);
        c.args(["demo", "--json", "--mode", mode, "--workers", &args.workers.to_string(), "--shards", &args.shards.to_string()]);
        c.args(["--straggler-delay-ms", &args.delay_ms.to_string(), "--straggler-probability", &args.probability.to_string()]);
        c.args(["--eval-every", &args.eval_every.to_string(), "--epochs", &args.epochs.to_string()]);
        if !args.straggler_only {
            c.arg("--delay-every-worker");
        }
        c.args(extra);
        let out = c.output().context("running parasync demo")?;
        if !out.status.success() {
            bail!("{config}: the demo failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("{config}: the demo's JSON"))?;
        let waits: Vec<f64> = r["wait_fraction"].as_array().context("wait_fraction")?.iter().filter_map(|w| w.as_f64()).collect();
        let (mut n, mut sum, mut max) = (0u64, 0u64, 0u64);
        for (s, count) in r["staleness"].as_object().context("staleness")? {
            let (s, count) = (s.parse::<u64>()?, count.as_u64().unwrap_or(0));
            n += count;
            sum += s * count;
            if count > 0 {
                max = max.max(s);
            }
        }
        let row = Row {
            config: config.clone(),
            mode: mode.to_string(),
            bound: *bound,
            seconds_to_095: r["seconds_to_095"].as_f64(),
            final_accuracy: r["test_accuracy"].as_f64().unwrap_or(0.0),
            wall_seconds: r["wall_seconds"].as_f64().unwrap_or(0.0),
            steps_per_worker: r["steps_per_worker"].as_u64().unwrap_or(0),
            wait_fraction: waits.iter().sum::<f64>() / waits.len().max(1) as f64,
            mean_staleness: sum as f64 / n.max(1) as f64,
            max_staleness: max,
            curve: r["accuracy_curve"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| Some((p["seconds"].as_f64()?, p["accuracy"].as_f64()?))).collect())
                .unwrap_or_default(),
        };
        eprintln!(
            "[{}/{}] {:<22} 0.95 after {:>7}  final accuracy {:.4}  wait {:>3.0} %  staleness mean {:.2} max {}  ({:.1} s)",
            i + 1,
            configs.len(),
            row.config,
            row.seconds_to_095.map_or("never".into(), |t| format!("{t:.2} s")),
            row.final_accuracy,
            row.wait_fraction * 100.0,
            row.mean_staleness,
            row.max_staleness,
            row.wall_seconds
        );
        rows.push(row);
    }
    let table = markdown(&rows);
    print!("{table}");
    if let Some(base) = &args.out {
        if let Some(dir) = base.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(base.with_extension("md"), &table)?;
        let lines: Vec<String> = rows.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
        std::fs::write(base.with_extension("jsonl"), lines.join("\n") + "\n")?;
        crate::svgplot::write_beside(&base.with_extension("md"), plots(&rows, args))?;
    }
    Ok(rows)
}

/// The results as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| mode | time to 0.95 (s) | accuracy at the end | wall (s) | steps per worker | wait (mean of workers) | staleness mean / max |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {:.4} | {:.2} | {} | {:.0} % | {:.2} / {} |\n",
            r.config,
            r.seconds_to_095.map_or("never".into(), |t| format!("{t:.2}")),
            r.final_accuracy,
            r.wall_seconds,
            r.steps_per_worker,
            r.wait_fraction * 100.0,
            r.mean_staleness,
            r.max_staleness
        );
    }
    s
}

/// Accuracy against wall time per configuration; wait fraction against S (sync as S = 0,
/// async drawn dashed across).
pub fn plots(rows: &[Row], args: &StalenessArgs) -> Vec<(String, String)> {
    let who = if args.straggler_only { "the last worker" } else { "every worker" };
    let setting = format!("{} workers, {} shards; {who}: {} ms extra on {:.0} % of steps", args.workers, args.shards, args.delay_ms, args.probability * 100.0);
    let curves: Vec<Series> = rows
        .iter()
        .map(|r| Series { label: r.config.clone(), points: r.curve.iter().map(|&(t, a)| (t, a)).collect(), dashed: false })
        .collect();
    let accuracy = line_chart(&format!("Held-out accuracy over time ({setting})"), "seconds", "accuracy (worker 0)", &curves);
    let bounded: Vec<(f64, f64)> = rows.iter().filter(|r| r.bound.is_some()).map(|r| (r.bound.unwrap() as f64, r.wait_fraction * 100.0)).collect();
    let xmax = bounded.iter().map(|p| p.0).fold(1.0, f64::max);
    let mut series = vec![Series { label: "sync (S = 0) and bounded S".into(), points: bounded, dashed: false }];
    if let Some(a) = rows.iter().find(|r| r.config == "async") {
        series.push(Series { label: "async".into(), points: vec![(0.0, a.wait_fraction * 100.0), (xmax, a.wait_fraction * 100.0)], dashed: true });
    }
    let wait = line_chart(&format!("Time spent waiting against the bound ({setting})"), "staleness bound S", "% of a worker's time waiting", &series);
    vec![("accuracy".into(), accuracy), ("wait".into(), wait)]
}
