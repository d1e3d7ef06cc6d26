//! `allreduce-bench`: the nccl-tests-style allreduce table (size, count, type, time, algbw,
//! busbw) for N ranks over the TCP data plane.
//!
//! Without `--rank` it launches `--ranks` local processes of the current executable with the
//! same arguments plus `--rank I --master ADDR` (rank 0 binds an ephemeral rendezvous port
//! and announces it on its first stdout line). With `--rank` (or `--from-env`) it runs one
//! rank, so ranks on several hosts can be started by any launcher.
//! `algbw = bytes / time`, `busbw = algbw × 2(n-1)/n`; time is the slowest rank's mean per
//! operation, median over `--reps` repetitions.
//!
//! [`led`] runs the same measurement under a harness that picks iteration counts itself
//! (the criterion bench `benches/allreduce.rs`): rank 0 orders each batch to follower ranks.

pub mod led;

use crate::comm::{Algorithm, CommConfig, Communicator};
use crate::dtype::{Bf16, DType, Element, ReduceOp};
use crate::rendezvous::{connect, connect_hosting, ConnectOptions, JoinSpec, RendezvousHost};
use crate::transport::tcp::TcpOptions;
use anyhow::{bail, Context};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// First stdout line of a rank 0 that bound an ephemeral rendezvous port.
pub const RENDEZVOUS_LINE: &str = "PARASYNC_RENDEZVOUS";

/// Arguments of `allreduce-bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct AllreduceBenchArgs {
    /// Number of ranks (local processes to launch, or the world size with --rank).
    #[arg(long, default_value_t = 2)]
    pub ranks: usize,
    /// Message sizes per rank (B, KiB, MiB, GiB), comma-separated.
    #[arg(long, default_value = "4KiB,64KiB,1MiB,16MiB,64MiB,256MiB")]
    pub sizes: String,
    /// Element types, comma-separated (f32, bf16, f64, i32, i64).
    #[arg(long, default_value = "f32")]
    pub dtypes: String,
    /// Algorithm: auto, direct or ring.
    #[arg(long, default_value = "auto")]
    pub algorithm: Algorithm,
    /// Under auto, direct while (ranks - 1) x message bytes is at most this.
    #[arg(long)]
    pub small_max_bytes: Option<usize>,
    /// Bytes per frame of the pipelined ring.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk_bytes: usize,
    /// Busy-poll the sockets (lowest latency; one busy core per rank).
    #[arg(long)]
    pub spin: bool,
    /// TCP connections per pair of ranks (large transfers spread their frames over them).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Move every payload through the sockets, even between ranks on one host (no
    /// `process_vm_readv` peer copies).
    #[arg(long)]
    pub no_peer_copy: bool,
    /// Allocate the buffers on transparent huge pages (`MADV_HUGEPAGE`), as NumPy does for
    /// arrays of 4 MiB or more and PyTorch does with `THP_MEM_ALLOC_ENABLE=1`.
    #[arg(long)]
    pub huge_pages: bool,
    /// Allreduce each message as tensors of this many bytes with `allreduce_fused` (as
    /// DDP and Horovod reduce a model's gradients), in buckets of `--bucket-bytes`.
    #[arg(long, value_parser = parse_size)]
    pub fuse: Option<usize>,
    /// Bucket size of `--fuse`.
    #[arg(long, default_value = "25MiB", value_parser = parse_size)]
    pub bucket_bytes: usize,
    /// Seconds each timed repetition should take (iteration count is set from it).
    #[arg(long, default_value_t = 0.2)]
    pub target_s: f64,
    /// Timed repetitions per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Per-operation timeout in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Run as this rank only (multi-host: start one per host with the same --master).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Rendezvous host:port (rank 0 may give port 0 to pick one and print it).
    #[arg(long)]
    pub master: Option<String>,
    /// Take rank, world size and master from the launcher's environment (torchrun, TF_CONFIG, Slurm).
    #[arg(long)]
    pub from_env: bool,
    /// Job token (every rank must use the same).
    #[arg(long, env = "PARASYNC_JOB_TOKEN", default_value = "parasync-bench")]
    pub token: String,
    /// Pin rank r's threads to CPU r mod (CPUs this process may use), so that runs compare
    /// with the same placement (the scheduler's own placement of oversubscribed ranks varies
    /// from run to run).
    #[arg(long)]
    pub pin_cores: bool,
}

/// Parses `4KiB`, `64MiB`, `1GiB`, `100B` or a plain byte count.
pub fn parse_size(s: &str) -> anyhow::Result<usize> {
    let s = s.trim();
    for (unit, mult) in [
        ("GiB", 1usize << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ] {
        if let Some(n) = s.strip_suffix(unit) {
            return Ok(n
                .trim()
                .parse::<usize>()
                .with_context(|| format!("bad size {s:?}"))?
                * mult);
        }
    }
    s.parse().with_context(|| format!("bad size {s:?}"))
}

/// Runs the benchmark: launches local ranks, or runs one rank (`--rank` / `--from-env`).
pub fn run(args: &AllreduceBenchArgs) -> anyhow::Result<()> {
    if args.rank.is_some() || args.from_env {
        return run_rank(args);
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    launch_local(args, &exe, &argv)
}

/// Rank processes started by this one: killed (and reaped) when dropped, so that an error or
/// a panic on the launching side leaves none behind.
pub struct RankProcesses(pub Vec<Child>);

impl Drop for RankProcesses {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // Already exited children are only reaped; kill errors mean exactly that.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Launches `args.ranks` processes `exe argv… --rank I --master ADDR` on this host and
/// forwards rank 0's table to stdout. Fails (killing the others) if any rank fails.
pub fn launch_local(
    args: &AllreduceBenchArgs,
    exe: &Path,
    argv: &[OsString],
) -> anyhow::Result<()> {
    let spawn = |rank: usize, master: &str, stdout: Stdio| -> anyhow::Result<Child> {
        Command::new(exe)
            .args(argv)
            .args(["--rank", &rank.to_string(), "--master", master])
            .stdout(stdout)
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", exe.display()))
    };
    let mut children = RankProcesses(vec![spawn(0, "127.0.0.1:0", Stdio::piped())?]);
    let mut out = BufReader::new(children.0[0].stdout.take().expect("piped stdout"));
    let mut line = String::new();
    out.read_line(&mut line)?;
    let Some(addr) = line
        .trim()
        .strip_prefix(RENDEZVOUS_LINE)
        .map(str::trim)
        .map(str::to_string)
    else {
        bail!("rank 0 did not announce its rendezvous address (got {line:?})");
    };
    for r in 1..args.ranks {
        children.0.push(spawn(r, &addr, Stdio::null())?);
    }
    let forward = std::thread::spawn(move || {
        let stdout = std::io::stdout();
        for l in out.lines().map_while(Result::ok) {
            let _ = writeln!(stdout.lock(), "{l}");
        }
    });
    let mut failed = None;
    loop {
        let mut running = false;
        for (r, c) in children.0.iter_mut().enumerate() {
            match c.try_wait()? {
                Some(st) if !st.success() => failed = failed.or(Some((r, st))),
                Some(_) => {}
                None => running = true,
            }
        }
        if failed.is_some() || !running {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some((r, st)) = failed {
        // Give the others their timeout to report, then make sure nothing is left behind.
        std::thread::sleep(Duration::from_millis(500));
        drop(children);
        let _ = forward.join();
        bail!("rank {r} failed: {st}");
    }
    let _ = forward.join();
    Ok(())
}

fn comm_config(args: &AllreduceBenchArgs) -> CommConfig {
    let mut cfg = CommConfig {
        timeout: Duration::from_secs(args.timeout_s),
        chunk_bytes: args.chunk_bytes,
        algorithm: args.algorithm,
        ..CommConfig::default()
    };
    if let Some(s) = args.small_max_bytes {
        cfg.small_max_bytes = s;
    }
    cfg
}

/// Options for joining the benchmark's job as `rank` of `world` at `master`, with the tuning
/// and timeout of `args` (every rank must pass the same tuning flags).
pub fn connect_options(
    args: &AllreduceBenchArgs,
    rank: usize,
    world: usize,
    master: String,
    token: String,
) -> anyhow::Result<ConnectOptions> {
    Ok(ConnectOptions {
        spec: JoinSpec {
            rank,
            world_size: world,
            master,
            token,
            // As every rank of the job: from PARASYNC_AUTH_TOKEN and PARASYNC_TLS_* (the
            // ranks this command starts inherit them).
            auth_token: parasync_proto::auth::AuthToken::from_env().map_err(anyhow::Error::msg)?,
            tls: crate::JobTls::from_env().map_err(anyhow::Error::msg)?,
            timeout: Duration::from_secs(args.timeout_s),
        },
        comm: comm_config(args),
        tcp: TcpOptions {
            spin: args.spin,
            streams: args.streams,
            peer_copy: !args.no_peer_copy,
        },
        data_host: None,
    })
}

/// Pins the calling thread (and the threads it starts later) to the `rank`-th CPU, modulo the
/// CPUs it may run on.
fn pin_to_core(rank: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the libc calls get its true size.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &allowed)).collect();
        anyhow::ensure!(!cpus.is_empty(), "no CPU to pin to");
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus[rank % cpus.len()], &mut one);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

/// Connects this process as one rank of the benchmark (printing the rendezvous address
/// first when it is rank 0 on an ephemeral port).
fn connect_rank(args: &AllreduceBenchArgs) -> anyhow::Result<Communicator> {
    let (rank, world, master, token) = if args.from_env {
        let l = crate::env::from_env()?;
        (l.rank, l.world_size, l.master, l.token)
    } else {
        let master = args
            .master
            .clone()
            .context("--rank needs --master host:port")?;
        (
            args.rank.expect("rank mode"),
            args.ranks,
            master,
            args.token.clone(),
        )
    };
    if args.pin_cores {
        pin_to_core(rank)?;
    }
    let opts = connect_options(args, rank, world, master.clone(), token)?;
    if rank == 0 && master.ends_with(":0") {
        let host = RendezvousHost::bind(&master)?;
        println!("{RENDEZVOUS_LINE} {}", host.local_addr()?);
        std::io::stdout().flush()?;
        return Ok(connect_hosting(&opts, host)?);
    }
    Ok(connect(&opts)?)
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Bytes per rank.
    pub bytes: usize,
    /// Elements per rank.
    pub count: usize,
    /// Element type.
    pub dtype: DType,
    /// Median seconds per operation (slowest rank).
    pub seconds: f64,
    /// Bytes / time, GB/s.
    pub algbw: f64,
    /// algbw × 2(n-1)/n, GB/s.
    pub busbw: f64,
}

/// Runs one rank of the benchmark; rank 0 prints the table.
pub fn run_rank(args: &AllreduceBenchArgs) -> anyhow::Result<()> {
    let mut comm = connect_rank(args)?;
    let sizes: Vec<usize> = args
        .sizes
        .split(',')
        .map(parse_size)
        .collect::<anyhow::Result<_>>()?;
    let dtypes: Vec<DType> = args
        .dtypes
        .split(',')
        .map(|d| d.parse::<DType>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let n = comm.world_size();
    if comm.rank() == 0 {
        println!(
            "# parasync allreduce-bench: {n} ranks, algorithm {:?}, chunk {} B, spin {}, streams {}, peer copies {}, huge pages {}",
            args.algorithm, args.chunk_bytes, args.spin, args.streams, !args.no_peer_copy, args.huge_pages
        );
        if let Some(t) = args.fuse {
            println!("# fused: tensors of {t} B in buckets of {} B (allreduce_fused)", args.bucket_bytes);
        }
        println!(
            "#{:>12} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8}",
            "size", "count", "type", "redop", "time", "algbw", "busbw"
        );
        println!(
            "#{:>12} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8}",
            "(B)", "(elements)", "", "", "(us)", "(GB/s)", "(GB/s)"
        );
    }
    for &dtype in &dtypes {
        for &bytes in &sizes {
            let row = match dtype {
                DType::F32 => measure::<f32>(&mut comm, bytes, args)?,
                DType::Bf16 => measure::<Bf16>(&mut comm, bytes, args)?,
                DType::F64 => measure::<f64>(&mut comm, bytes, args)?,
                DType::I32 => measure::<i32>(&mut comm, bytes, args)?,
                DType::I64 => measure::<i64>(&mut comm, bytes, args)?,
            };
            if comm.rank() == 0 {
                println!(
                    " {:>12} {:>12} {:>6} {:>6} {:>10.1} {:>8.3} {:>8.3}",
                    row.bytes,
                    row.count,
                    row.dtype.name(),
                    "sum",
                    row.seconds * 1e6,
                    row.algbw,
                    row.busbw
                );
                std::io::stdout().flush()?;
            }
        }
    }
    comm.barrier()?;
    Ok(())
}

/// Times allreduce(sum) of `bytes` per rank: warm-up, an iteration count agreed through a
/// broadcast from rank 0, then `reps` timed repetitions (slowest rank, median).
pub fn measure<T: Element>(
    comm: &mut Communicator,
    bytes: usize,
    args: &AllreduceBenchArgs,
) -> anyhow::Result<Row> {
    let count = bytes / std::mem::size_of::<T>();
    let mut buf = if args.huge_pages {
        parasync_tensor::filled_vec(count, T::default())
    } else {
        vec![T::default(); count]
    };
    let fuse = args.fuse.map(|t| Fuse { tensor_len: (t / std::mem::size_of::<T>()).max(1), bucket_bytes: args.bucket_bytes });
    let t0 = Instant::now();
    time_allreduces(comm, &mut buf, 3, fuse)?;
    let per_op = t0.elapsed().as_secs_f64() / 3.0;
    let mut iters = [((args.target_s / per_op.max(1e-7)) as i64).clamp(1, 100_000)];
    comm.broadcast(&mut iters, 0)?;
    let iters = iters[0] as usize;
    let mut times = Vec::with_capacity(args.reps);
    for _ in 0..args.reps.max(1) {
        times.push(time_allreduces(comm, &mut buf, iters, fuse)? / iters as f64);
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let n = comm.world_size() as f64;
    let moved = (count * std::mem::size_of::<T>()) as f64;
    let algbw = moved / seconds / 1e9;
    Ok(Row {
        bytes: moved as usize,
        count,
        dtype: T::DTYPE,
        seconds,
        algbw,
        busbw: algbw * 2.0 * (n - 1.0) / n,
    })
}

/// How [`time_allreduces`] cuts its buffer into tensors for `allreduce_fused`.
#[derive(Clone, Copy, Debug)]
pub struct Fuse {
    /// Elements per tensor (the last may be shorter).
    pub tensor_len: usize,
    /// Bucket size passed to `allreduce_fused`.
    pub bucket_bytes: usize,
}

/// Times `iters` allreduce(sum) of `buf` (with `fuse`: of its tensors, fused) after a
/// barrier and returns the slowest rank's seconds for all of them (every rank gets the same
/// value). Every rank must call it with the same `buf` length, `iters` and `fuse`.
pub fn time_allreduces<T: Element>(
    comm: &mut Communicator,
    buf: &mut [T],
    iters: usize,
    fuse: Option<Fuse>,
) -> crate::Result<f64> {
    let mut tensors: Vec<&mut [T]> = match fuse {
        Some(f) => buf.chunks_mut(f.tensor_len).collect(),
        None => vec![buf],
    };
    comm.barrier()?;
    let t = Instant::now();
    for _ in 0..iters {
        match fuse {
            Some(f) => comm.allreduce_fused(&mut tensors, ReduceOp::Sum, f.bucket_bytes)?,
            None => comm.allreduce(tensors[0], ReduceOp::Sum)?,
        }
    }
    let mut elapsed = [t.elapsed().as_secs_f64()];
    comm.allreduce(&mut elapsed, ReduceOp::Max)?;
    Ok(elapsed[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("100B").unwrap(), 100);
        assert_eq!(parse_size("77").unwrap(), 77);
        assert!(parse_size("lots").is_err());
    }
}
