//! `nccl-smoke`: NCCL backend smoke test for a GPU machine. Launches one rank per visible
//! GPU (NCCL allows one rank per GPU), checks allreduce / broadcast / allgather /
//! reduce_scatter for f32 and bf16, then prints an nccl-tests-style allreduce table.
//! Exit status 0 only if every check passed.

use anyhow::{bail, Context};
use clap::Parser;
use parasync_collective::bench::{parse_size, RENDEZVOUS_LINE};
use parasync_collective::nccl::{unavailable_reason, DeviceBf16, NcclCommunicator, NcclElement};
use parasync_collective::{
    CommConfig, ConnectOptions, JoinSpec, ReduceOp, RendezvousHost, TcpOptions,
};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Args {
    /// Message sizes of the bandwidth table.
    #[arg(long, default_value = "1MiB,4MiB,16MiB,64MiB,256MiB,1GiB")]
    sizes: String,
    /// Ranks to launch (default: one per visible GPU).
    #[arg(long)]
    ranks: Option<usize>,
    /// Run as this rank (set by the launcher).
    #[arg(long)]
    rank: Option<usize>,
    #[arg(long)]
    world: Option<usize>,
    #[arg(long)]
    master: Option<String>,
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.rank {
        Some(rank) => run_rank(&args, rank),
        None => launch(&args),
    }
}

fn launch(args: &Args) -> anyhow::Result<()> {
    if let Some(why) = unavailable_reason() {
        bail!("cannot run the NCCL smoke test: {why}");
    }
    let gpus = cudarc::driver::CudaContext::device_count().context("counting GPUs")? as usize;
    let n = args.ranks.unwrap_or(gpus);
    if n == 0 || n > gpus {
        bail!("{n} ranks requested but {gpus} GPU(s) visible (NCCL allows one rank per GPU)");
    }
    println!("# nccl-smoke: {n} rank(s), one per GPU ({gpus} visible)");
    if n == 1 {
        println!(
            "# one rank: busbw = algbw x 2(n-1)/n is 0 by definition; algbw shows the local cost"
        );
    }
    let exe = std::env::current_exe()?;
    let spawn = |rank: usize, master: &str, out: Stdio| {
        Command::new(&exe)
            .args([
                "--sizes",
                &args.sizes,
                "--timeout-s",
                &args.timeout_s.to_string(),
            ])
            .args([
                "--rank",
                &rank.to_string(),
                "--world",
                &n.to_string(),
                "--master",
                master,
            ])
            .stdout(out)
            .spawn()
    };
    let mut children = vec![spawn(0, "127.0.0.1:0", Stdio::piped())?];
    let mut out = BufReader::new(children[0].stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix(RENDEZVOUS_LINE)
        .map(|s| s.trim().to_string())
        .context("rank 0 did not start")?;
    for r in 1..n {
        children.push(spawn(r, &addr, Stdio::inherit())?);
    }
    for l in out.lines().map_while(Result::ok) {
        println!("{l}");
    }
    let mut ok = true;
    for (r, c) in children.iter_mut().enumerate() {
        let st = c.wait()?;
        if !st.success() {
            eprintln!("rank {r} failed: {st}");
            ok = false;
        }
    }
    if !ok {
        bail!("nccl-smoke FAILED");
    }
    println!("# nccl-smoke PASSED");
    Ok(())
}

fn run_rank(args: &Args, rank: usize) -> anyhow::Result<()> {
    let world = args.world.context("--world")?;
    let master = args.master.clone().context("--master")?;
    let timeout = Duration::from_secs(args.timeout_s);
    let opts = ConnectOptions {
        spec: JoinSpec {
            rank,
            world_size: world,
            master: master.clone(),
            token: "nccl-smoke".into(),
            auth_token: None,
            tls: None,
            timeout,
        },
        comm: CommConfig {
            timeout,
            ..CommConfig::default()
        },
        tcp: TcpOptions::default(),
        data_host: None,
    };
    let host = if rank == 0 {
        let h = RendezvousHost::bind(&master)?;
        println!("{RENDEZVOUS_LINE} {}", h.local_addr()?);
        std::io::stdout().flush()?;
        Some(h)
    } else {
        None
    };
    let mut c = NcclCommunicator::connect(&opts, host, rank)?;
    checks::<f32>(&mut c, "f32", |v| v as f32, |x| x as f64)?;
    checks::<DeviceBf16>(&mut c, "bf16", DeviceBf16::from_f64, |x| x.to_f64())?;
    c.set_checked(false);
    if rank == 0 {
        println!(
            "#{:>12} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8}",
            "size", "count", "type", "redop", "time", "algbw", "busbw"
        );
        println!(
            "#{:>12} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8}",
            "(B)", "(elements)", "", "", "(us)", "(GB/s)", "(GB/s)"
        );
    }
    for size in args.sizes.split(',') {
        let bytes = parse_size(size)?;
        table_row::<f32>(&mut c, bytes, "f32")?;
        table_row::<DeviceBf16>(&mut c, bytes, "bf16")?;
    }
    c.set_checked(true);
    c.barrier()?;
    Ok(())
}

fn say(rank: usize, line: String) {
    if rank == 0 {
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
}

/// Exact checks: values are small integers, exact in bf16 and f32 for up to 8 ranks.
fn checks<T: NcclElement>(
    c: &mut NcclCommunicator,
    name: &str,
    from: impl Fn(f64) -> T,
    to: impl Fn(T) -> f64,
) -> anyhow::Result<()> {
    let (me, n) = (c.rank(), c.world_size());
    let count = (1 << 20) + 3;
    let pattern = |i: usize| ((i % 7) + 1) as f64;
    let s = c.stream().clone();
    let host: Vec<T> = (0..count)
        .map(|i| from((me + 1) as f64 * pattern(i)))
        .collect();
    let mut dev = s.clone_htod(&host)?;
    c.allreduce(&mut dev, ReduceOp::Sum)?;
    let got = s.clone_dtoh(&dev)?;
    let tri = (n * (n + 1) / 2) as f64;
    let bad = (0..count)
        .filter(|&i| to(got[i]) != tri * pattern(i))
        .count();
    if bad > 0 {
        bail!(
            "allreduce {name}: {bad} of {count} elements wrong (first: {})",
            to(got[0])
        );
    }
    say(
        me,
        format!("CHECK allreduce sum {name} ({count} elements, {n} ranks) OK"),
    );

    // Every op out of place, into a buffer filled with a sentinel: a call that never ran,
    // or a wrong op, shows even with one rank (where an in-place sum equals its input).
    let send = s.clone_htod(&host)?;
    for (op, want) in [
        (ReduceOp::Sum, tri),
        (ReduceOp::Avg, tri / n as f64),
        (ReduceOp::Min, 1.0),
        (ReduceOp::Max, n as f64),
    ] {
        let mut recv = s.clone_htod(&vec![from(-3.0); count])?;
        c.allreduce_into(&send, &mut recv, op)?;
        let got = s.clone_dtoh(&recv)?;
        // Avg may scale by 1/n rather than divide: within bf16's precision, not exact.
        let slack = if op == ReduceOp::Avg { 1.0 / 128.0 } else { 0.0 };
        let bad = (0..count)
            .filter(|&i| (to(got[i]) - want * pattern(i)).abs() > slack * want * pattern(i))
            .count();
        if bad > 0 {
            bail!("allreduce_into {op:?} {name}: {bad} of {count} elements wrong (first: {})", to(got[0]));
        }
    }
    say(me, format!("CHECK allreduce_into sum/avg/min/max {name} OK"));

    let root = n - 1;
    let host: Vec<T> = (0..count)
        .map(|i| from(if me == root { (i % 100) as f64 } else { -1.0 }))
        .collect();
    let mut dev = s.clone_htod(&host)?;
    c.broadcast(&mut dev, root)?;
    let got = s.clone_dtoh(&dev)?;
    if (0..count).any(|i| to(got[i]) != (i % 100) as f64) {
        bail!("broadcast {name} from rank {root}: wrong data");
    }
    say(me, format!("CHECK broadcast {name} (root {root}) OK"));

    let per = 1001;
    let host: Vec<T> = (0..per).map(|i| from((me * 10 + i % 10) as f64)).collect();
    let send = s.clone_htod(&host)?;
    let mut recv = s.alloc_zeros::<T>(per * n)?;
    c.allgather(&send, &mut recv)?;
    let got = s.clone_dtoh(&recv)?;
    if (0..n * per).any(|j| to(got[j]) != ((j / per) * 10 + (j % per) % 10) as f64) {
        bail!("allgather {name}: wrong data");
    }
    say(me, format!("CHECK allgather {name} OK"));

    let host: Vec<T> = (0..per * n)
        .map(|i| from(pattern(i) * (me + 1) as f64))
        .collect();
    let send = s.clone_htod(&host)?;
    let mut recv = s.alloc_zeros::<T>(per)?;
    c.reduce_scatter(&send, &mut recv, ReduceOp::Sum)?;
    let got = s.clone_dtoh(&recv)?;
    if (0..per).any(|i| to(got[i]) != tri * pattern(me * per + i)) {
        bail!("reduce_scatter {name}: wrong data");
    }
    say(me, format!("CHECK reduce_scatter {name} OK"));
    Ok(())
}

fn table_row<T: NcclElement>(
    c: &mut NcclCommunicator,
    bytes: usize,
    name: &str,
) -> anyhow::Result<()> {
    let count = bytes / std::mem::size_of::<T>();
    let s = c.stream().clone();
    let mut dev = s.alloc_zeros::<T>(count)?;
    for _ in 0..3 {
        c.allreduce(&mut dev, ReduceOp::Sum)?;
    }
    let iters = ((4usize << 30) / bytes.max(1)).clamp(5, 100);
    c.barrier()?;
    let t = Instant::now();
    for _ in 0..iters {
        c.allreduce(&mut dev, ReduceOp::Sum)?;
    }
    let secs = t.elapsed().as_secs_f64() / iters as f64;
    let n = c.world_size() as f64;
    let algbw = bytes as f64 / secs / 1e9;
    let busbw = algbw * 2.0 * (n - 1.0) / n;
    say(
        c.rank(),
        format!(
            " {:>12} {:>12} {:>6} {:>6} {:>10.1} {:>8.2} {:>8.2}",
            bytes,
            count,
            name,
            "sum",
            secs * 1e6,
            algbw,
            busbw
        ),
    );
    Ok(())
}
