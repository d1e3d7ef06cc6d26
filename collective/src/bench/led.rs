//! Allreduce batches led by rank 0, for harnesses that choose iteration counts on the fly
//! (criterion's `iter_custom`): the harness process is rank 0 ([`Leader`]), ranks 1..N-1
//! are child processes running [`run_follower`]. Before each batch rank 0 broadcasts an
//! [`Order`] (iterations, bytes, dtype, or stop) through the same communicator; then every
//! rank runs [`time_allreduces`] and rank 0 gets the slowest rank's time.

use super::{connect_options, connect_rank, time_allreduces, AllreduceBenchArgs, RankProcesses};
use crate::algo::typed;
use crate::comm::Communicator;
use crate::dtype::{Bf16, DType};
use crate::error::{Error, Result};
use crate::rendezvous::{connect_hosting, RendezvousHost};
use anyhow::{bail, Context};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What rank 0 asks the followers to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Run one timed batch.
    Run(Batch),
    /// Leave the job (the follower returns).
    Stop,
}

/// One timed batch: `iters` allreduce(sum) of `bytes` per rank of `dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Allreduces to run (at least 1).
    pub iters: u64,
    /// Bytes per rank: a multiple of the element size.
    pub bytes: usize,
    /// Element type.
    pub dtype: DType,
}

impl Batch {
    /// Elements per rank.
    pub fn count(&self) -> usize {
        self.bytes / self.dtype.size()
    }
}

impl Order {
    /// The order as broadcast: `[iters, bytes, dtype code]`, all zero for [`Order::Stop`].
    pub fn encode(self) -> [i64; 3] {
        match self {
            Order::Stop => [0; 3],
            Order::Run(b) => [b.iters as i64, b.bytes as i64, i64::from(b.dtype.code())],
        }
    }

    /// Inverse of [`Order::encode`]; rejects what rank 0 would never send.
    pub fn decode(words: [i64; 3]) -> Result<Order> {
        let bad = |why: &str| Error::InvalidArgument(format!("batch order {words:?}: {why}"));
        if words == [0; 3] {
            return Ok(Order::Stop);
        }
        let [iters, bytes, code] = words;
        let iters = u64::try_from(iters)
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| bad("iterations must be positive"))?;
        let bytes = usize::try_from(bytes).map_err(|_| bad("negative size"))?;
        let dtype = u8::try_from(code)
            .ok()
            .and_then(DType::from_code)
            .ok_or_else(|| bad("unknown dtype"))?;
        if !bytes.is_multiple_of(dtype.size()) {
            return Err(bad("size is not a whole number of elements"));
        }
        Ok(Order::Run(Batch {
            iters,
            bytes,
            dtype,
        }))
    }
}

/// Runs `batch` on this rank (every rank at once), reusing `buf` so that its pages stay
/// mapped between batches. Returns the slowest rank's seconds for the whole batch.
fn run_batch(comm: &mut Communicator, buf: &mut Vec<u64>, batch: &Batch) -> Result<f64> {
    let (n, iters) = (batch.count(), batch.iters as usize);
    // Grown here, on ordinary pages like a caller's plain `Vec` (`typed` alone would put a
    // large one on huge pages).
    let words = (n * batch.dtype.size()).div_ceil(8);
    if buf.len() < words {
        buf.resize(words, 0);
    }
    match batch.dtype {
        DType::F32 => time_allreduces(comm, typed::<f32>(buf, n), iters, None),
        DType::Bf16 => time_allreduces(comm, typed::<Bf16>(buf, n), iters, None),
        DType::F64 => time_allreduces(comm, typed::<f64>(buf, n), iters, None),
        DType::I32 => time_allreduces(comm, typed::<i32>(buf, n), iters, None),
        DType::I64 => time_allreduces(comm, typed::<i64>(buf, n), iters, None),
    }
}

/// One follower rank (`--ranks N --rank R --master ADDR` and the leader's tuning flags, or
/// `--from-env`): joins the job, then runs the batches rank 0 orders until it says stop.
/// Waiting for an order is bounded by `--timeout-s`, like every operation.
pub fn run_follower(args: &AllreduceBenchArgs) -> anyhow::Result<()> {
    let mut comm = connect_rank(args)?;
    if comm.rank() == 0 {
        bail!("a follower is a rank other than 0 (rank 0 is the leading harness)");
    }
    let mut buf = Vec::new();
    loop {
        let mut words = [0i64; 3];
        comm.broadcast(&mut words, 0)?;
        match Order::decode(words)? {
            Order::Stop => return Ok(()),
            Order::Run(batch) => {
                run_batch(&mut comm, &mut buf, &batch)?;
            }
        }
    }
}

/// Flags of the follower subcommand, parsed the same way on the leader so that both sides
/// agree on the tuning.
#[derive(clap::Parser)]
#[command(no_binary_name = true)]
struct Flags {
    #[command(flatten)]
    args: AllreduceBenchArgs,
}

/// Rank 0 of a local job whose other ranks are follower processes; they are killed when the
/// leader is dropped without [`Leader::finish`] (an error or a panic in the harness).
pub struct Leader {
    comm: Communicator,
    /// Aligned storage of the batch buffer, kept so its pages are touched once.
    buf: Vec<u64>,
    followers: RankProcesses,
    /// Bound on waiting for the followers to exit after the stop order.
    exit_timeout: Duration,
}

impl Leader {
    /// Starts `ranks - 1` followers `exe subcommand --ranks N --rank R --master ADDR flags…`
    /// (`subcommand` must call [`run_follower`]) and forms the job with them, hosting the
    /// rendezvous on 127.0.0.1 at a free port. `flags` are `allreduce-bench` tuning flags
    /// (`--algorithm`, `--chunk-bytes`, `--spin`, `--streams`, `--timeout-s`…) given to
    /// every rank. Waits at most `--timeout-s` for the followers to join.
    pub fn launch(
        exe: &Path,
        subcommand: &str,
        ranks: usize,
        flags: &[String],
    ) -> anyhow::Result<Leader> {
        let ranks_s = ranks.to_string();
        let argv = ["--ranks", ranks_s.as_str()]
            .into_iter()
            .chain(flags.iter().map(String::as_str));
        let args = <Flags as clap::Parser>::try_parse_from(argv)
            .with_context(|| format!("allreduce-bench flags {flags:?}"))?
            .args;
        if ranks < 2 {
            bail!("a led job needs at least 2 ranks, got {ranks}");
        }
        let host = RendezvousHost::bind("127.0.0.1:0")?;
        let master = host.local_addr()?.to_string();
        let mut followers = RankProcesses(Vec::with_capacity(ranks - 1));
        for r in 1..ranks {
            let child = Command::new(exe)
                .arg(subcommand)
                .args(["--ranks", &ranks_s, "--rank", &r.to_string()])
                .args(["--master", &master])
                .args(flags)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting follower rank {r} ({})", exe.display()))?;
            followers.0.push(child);
        }
        let opts = connect_options(&args, 0, ranks, master, args.token.clone())?;
        let comm = connect_hosting(&opts, host)
            .with_context(|| format!("forming a job of {ranks} ranks with the followers"))?;
        Ok(Leader {
            comm,
            buf: Vec::new(),
            followers,
            exit_timeout: Duration::from_secs(args.timeout_s.clamp(1, 10)),
        })
    }

    /// Number of ranks, this one included.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Orders `batch` and runs it with the followers; returns the slowest rank's time for
    /// the whole batch (what criterion's `iter_custom` expects for `batch.iters`).
    pub fn time(&mut self, batch: Batch) -> Result<Duration> {
        if batch.iters == 0 {
            return Ok(Duration::ZERO);
        }
        let mut words = Order::Run(batch).encode();
        self.comm.broadcast(&mut words, 0)?;
        let seconds = run_batch(&mut self.comm, &mut self.buf, &batch)?;
        Ok(Duration::from_secs_f64(seconds))
    }

    /// Tells the followers to stop and waits (bounded) for them to exit successfully.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let mut words = Order::Stop.encode();
        self.comm.broadcast(&mut words, 0)?;
        let until = Instant::now() + self.exit_timeout;
        for (i, child) in self.followers.0.iter_mut().enumerate() {
            let status = loop {
                if let Some(status) = child.try_wait()? {
                    break status;
                }
                if Instant::now() >= until {
                    bail!("follower rank {} did not exit after the stop order", i + 1);
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            if !status.success() {
                bail!("follower rank {} failed: {status}", i + 1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_round_trip() {
        let table = [
            Order::Stop,
            Order::Run(Batch {
                iters: 1,
                bytes: 4096,
                dtype: DType::F32,
            }),
            Order::Run(Batch {
                iters: 100_000,
                bytes: 64 << 20,
                dtype: DType::Bf16,
            }),
            Order::Run(Batch {
                iters: 3,
                bytes: 0,
                dtype: DType::I64,
            }),
        ];
        for order in table {
            assert_eq!(Order::decode(order.encode()).unwrap(), order, "{order:?}");
        }
    }

    #[test]
    fn bad_orders_are_refused() {
        let f32_code = i64::from(DType::F32.code());
        let table: [([i64; 3], &str); 5] = [
            ([0, 4096, f32_code], "iterations must be positive"),
            ([-1, 4096, f32_code], "iterations must be positive"),
            ([1, -8, f32_code], "negative size"),
            ([1, 4096, 99], "unknown dtype"),
            ([1, 4098, f32_code], "whole number of elements"),
        ];
        for (words, want) in table {
            let err = Order::decode(words).unwrap_err().to_string();
            assert!(err.contains(want), "{words:?}: {err}");
        }
    }
}
