//! Scenarios for the end-to-end tests. Each rank prints machine-readable lines:
//! `RESULT <name> <value>` on success and `ERROR culprit=<rank|-> seq=<n|-> ms=<elapsed> <message>`
//! when an operation fails (exit status 3).

use parasync_collective::bench::RENDEZVOUS_LINE;
use parasync_collective::{
    connect, connect_hosting, Bf16, CommConfig, Communicator, ConnectOptions, Error, JoinSpec,
    ReduceOp, RendezvousHost, TcpOptions,
};
use std::io::Write;
use std::time::{Duration, Instant};

/// Arguments of `collective-rank scenario`.
#[derive(clap::Args, Debug)]
pub struct ScenarioArgs {
    /// every-op | fused | digest | loop | mismatch-count | mismatch-dtype | barrier
    #[arg(long)]
    name: String,
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world: usize,
    /// Rendezvous host:port; rank 0 with port 0 picks one and prints it.
    #[arg(long)]
    master: String,
    #[arg(long, default_value = "test-job")]
    token: String,
    /// Per-operation timeout.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Elements per buffer where the scenario uses one.
    #[arg(long, default_value_t = 100_000)]
    count: usize,
    #[arg(long)]
    spin: bool,
    /// TCP connections per pair of ranks.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// No peer copies between ranks on this host: every payload through the sockets.
    #[arg(long)]
    no_peer_copy: bool,
    /// Bytes per frame of the pipelined algorithms.
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn run(a: &ScenarioArgs) -> anyhow::Result<()> {
    let opts = ConnectOptions {
        spec: JoinSpec {
            rank: a.rank,
            world_size: a.world,
            master: a.master.clone(),
            token: a.token.clone(),
            auth_token: parasync_proto::auth::AuthToken::from_env().map_err(anyhow::Error::msg)?,
            tls: parasync_collective::JobTls::from_env().map_err(anyhow::Error::msg)?,
            timeout: Duration::from_millis(a.timeout_ms),
        },
        comm: CommConfig {
            timeout: Duration::from_millis(a.timeout_ms),
            chunk_bytes: a.chunk_bytes,
            ..CommConfig::default()
        },
        tcp: TcpOptions {
            spin: a.spin,
            streams: a.streams,
            peer_copy: !a.no_peer_copy,
        },
        data_host: None,
    };
    let connected = if a.rank == 0 && a.master.ends_with(":0") {
        let host = RendezvousHost::bind(&a.master)?;
        say(format!("{RENDEZVOUS_LINE} {}", host.local_addr()?));
        connect_hosting(&opts, host)
    } else {
        connect(&opts)
    };
    let mut comm = match connected {
        Ok(c) => c,
        Err(e) => {
            say(format!("ERROR culprit=- seq=- ms=0 connect: {e}"));
            std::process::exit(3);
        }
    };
    let started = Instant::now();
    let result = match a.name.as_str() {
        "every-op" => every_op(&mut comm, a.count),
        "fused" => fused(&mut comm),
        "digest" => digest(&mut comm, a.count),
        "loop" => loop_allreduce(&mut comm, a.count),
        "steady" => steady(&mut comm, a.count),
        "mismatch-count" => mismatch(&mut comm, false),
        "mismatch-dtype" => mismatch(&mut comm, true),
        "barrier" => comm.barrier(),
        other => anyhow::bail!("unknown scenario {other}"),
    };
    match result {
        Ok(()) => {
            say(format!("RESULT done rank={}", comm.rank()));
            Ok(())
        }
        Err(e) => {
            let show = |x: Option<String>| x.unwrap_or_else(|| "-".into());
            say(format!(
                "ERROR culprit={} seq={} ms={} {e}",
                show(e.culprit().map(|c| c.to_string())),
                show(e.seq().map(|s| s.to_string())),
                started.elapsed().as_millis()
            ));
            drop(comm);
            std::process::exit(3);
        }
    }
}

fn value(rank: usize, i: usize) -> f64 {
    (((rank * 7919 + i * 104_729) % 61) as f64 - 30.0) * 0.25
}

fn check(cond: bool, what: String) -> Result<(), Error> {
    if cond {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("wrong result: {what}")))
    }
}

/// Every operation on every dtype at a small and a large size, checked exactly
/// (quarter-step values sum exactly in every dtype that can hold them).
fn every_op(c: &mut Communicator, count: usize) -> Result<(), Error> {
    let (me, n) = (c.rank(), c.world_size());
    for count in [0, 1, n + 1, 1000, count] {
        for op in ReduceOp::ALL {
            let expect = |i: usize| -> f64 {
                let xs = (0..n).map(|r| value(r, i));
                match op {
                    ReduceOp::Sum => xs.sum(),
                    ReduceOp::Avg => xs.sum::<f64>() / n as f64,
                    ReduceOp::Min => xs.fold(f64::INFINITY, f64::min),
                    ReduceOp::Max => xs.fold(f64::NEG_INFINITY, f64::max),
                }
            };
            let mut f: Vec<f32> = (0..count).map(|i| value(me, i) as f32).collect();
            c.allreduce(&mut f, op)?;
            for (i, v) in f.iter().enumerate() {
                check(
                    (*v as f64 - expect(i)).abs() <= 1e-5 * expect(i).abs().max(1.0),
                    format!("f32 {op} [{i}] {v}"),
                )?;
            }
            let mut b: Vec<Bf16> = (0..count)
                .map(|i| Bf16::from_f32(value(me, i) as f32))
                .collect();
            c.allreduce(&mut b, op)?;
            for (i, v) in b.iter().enumerate() {
                let want = Bf16::from_f32(expect(i) as f32).to_f32();
                check(
                    v.to_f32() == want,
                    format!("bf16 {op} [{i}] {} vs {want}", v.to_f32()),
                )?;
            }
            let mut d: Vec<f64> = (0..count).map(|i| value(me, i)).collect();
            c.allreduce(&mut d, op)?;
            for (i, v) in d.iter().enumerate() {
                check(
                    (v - expect(i)).abs() <= 1e-12 * expect(i).abs().max(1.0),
                    format!("f64 {op} [{i}]"),
                )?;
            }
            let mut i4: Vec<i32> = (0..count).map(|i| (value(me, i) * 4.0) as i32).collect();
            c.allreduce(&mut i4, op)?;
            let mut i8: Vec<i64> = (0..count).map(|i| (value(me, i) * 4.0) as i64).collect();
            c.allreduce(&mut i8, op)?;
            for i in 0..count {
                let want = match op {
                    ReduceOp::Avg => {
                        ((0..n).map(|r| (value(r, i) * 4.0) as i64).sum::<i64>()) / n as i64
                    }
                    _ => (expect(i) * 4.0) as i64,
                };
                check(
                    i4[i] as i64 == want && i8[i] == want,
                    format!("int {op} [{i}]"),
                )?;
            }
            let send: Vec<f64> = (0..n * count).map(|i| value(me, i)).collect();
            let mut recv = vec![0f64; count];
            c.reduce_scatter(&send, &mut recv, op)?;
            for (i, v) in recv.iter().enumerate() {
                check(
                    (v - expect(me * count + i)).abs() <= 1e-12 * v.abs().max(1.0),
                    format!("reduce_scatter {op} [{i}]"),
                )?;
            }
        }
        let root = n - 1;
        let mut b: Vec<f32> = (0..count)
            .map(|i| {
                if me == root {
                    value(root, i) as f32
                } else {
                    -1.0
                }
            })
            .collect();
        c.broadcast(&mut b, root)?;
        check(
            b.iter()
                .enumerate()
                .all(|(i, v)| *v == value(root, i) as f32),
            "broadcast".into(),
        )?;
        let send: Vec<Bf16> = (0..count)
            .map(|i| Bf16::from_f32(value(me, i) as f32))
            .collect();
        let mut all = vec![Bf16::default(); n * count];
        c.allgather(&send, &mut all)?;
        for r in 0..n {
            for i in 0..count {
                check(
                    all[r * count + i] == Bf16::from_f32(value(r, i) as f32),
                    format!("allgather [{r}][{i}]"),
                )?;
            }
        }
        c.barrier()?;
    }
    say(format!("RESULT every-op rank={me} peer_copied={}", c.peer_copied_bytes()));
    Ok(())
}

/// Fused buckets against one allreduce per tensor (integer-valued f32: exact in any order).
fn fused(c: &mut Communicator) -> Result<(), Error> {
    let me = c.rank();
    let sizes = [1usize, 1000, 7, 300_000, 64, 5000, 0, 3];
    let make = || -> Vec<Vec<f32>> {
        sizes
            .iter()
            .map(|&s| (0..s).map(|i| ((i * 31 + me * 17) % 101) as f32).collect())
            .collect()
    };
    let mut unfused = make();
    for t in unfused.iter_mut() {
        c.allreduce(t, ReduceOp::Sum)?;
    }
    let mut fused = make();
    let mut views: Vec<&mut [f32]> = fused.iter_mut().map(|t| t.as_mut_slice()).collect();
    c.allreduce_fused(&mut views, ReduceOp::Sum, 64 << 10)?;
    check(fused == unfused, "fused differs from unfused".into())?;
    say(format!("RESULT fused-equal rank={me}"));
    Ok(())
}

/// Prints a digest of an inexact float allreduce (determinism across runs).
fn digest(c: &mut Communicator, count: usize) -> Result<(), Error> {
    let me = c.rank();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (salt, len) in [(1usize, 100usize), (2, count), (3, count + 3)] {
        let mut v: Vec<f32> = (0..len)
            .map(|i| ((me * 131 + i * 7 + salt) as f32).sin() * 1e3 / (1.0 + i as f32))
            .collect();
        c.allreduce(&mut v, ReduceOp::Sum)?;
        let mut b: Vec<Bf16> = v.iter().map(|x| Bf16::from_f32(x * 0.37)).collect();
        c.allreduce(&mut b, ReduceOp::Avg)?;
        for x in &v {
            h = (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
        }
        for x in &b {
            h = (h ^ x.0 as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    say(format!("RESULT digest {h:016x}"));
    say(format!("RESULT peer_copied={}", c.peer_copied_bytes()));
    Ok(())
}

/// Allreduces until something fails (the fault tests kill a rank meanwhile).
fn loop_allreduce(c: &mut Communicator, count: usize) -> Result<(), Error> {
    let mut buf = vec![1.0f32; count];
    for i in 0.. {
        c.allreduce(&mut buf, ReduceOp::Max)?;
        if i == 2 {
            say(format!("RESULT looping rank={}", c.rank()));
        }
    }
    Ok(())
}

/// 60 allreduces in a row; reports the slowest one. No operation of a healthy job should
/// come near the timeout (a missed wakeup sleeps until 3/4 of it).
fn steady(c: &mut Communicator, count: usize) -> Result<(), Error> {
    let mut buf = vec![1.0f32; count];
    let mut slowest = Duration::ZERO;
    for _ in 0..60 {
        let t = Instant::now();
        c.allreduce(&mut buf, ReduceOp::Sum)?;
        slowest = slowest.max(t.elapsed());
        buf.iter_mut().for_each(|x| *x = 1.0);
    }
    say(format!("RESULT slowest_ms={} peer_copied={}", slowest.as_millis(), c.peer_copied_bytes()));
    Ok(())
}

/// Rank 1 calls with a different element count (or dtype) than the others.
fn mismatch(c: &mut Communicator, dtype: bool) -> Result<(), Error> {
    let odd = c.rank() == 1;
    if dtype && odd {
        let mut v = vec![0f64; 1000];
        return c.allreduce(&mut v, ReduceOp::Sum);
    }
    let mut v = vec![0f32; if odd && !dtype { 999 } else { 1000 }];
    c.allreduce(&mut v, ReduceOp::Sum)
}
