//! [`Communicator`]: the blocking collective API over any [`Transport`].

use crate::algo::{self, typed, Ctx, Scratch};
use crate::dtype::{Element, ReduceOp};
use crate::error::{Error, Result};
use crate::frame::{OpDesc, OpKind};
use crate::transport::{Deadline, Transport};
use std::time::Duration;

/// Which algorithm family runs an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Direct below [`CommConfig::small_max_bytes`], ring/chain above.
    #[default]
    Auto,
    /// Always the one-exchange direct algorithms (latency-optimal).
    Direct,
    /// Always the pipelined ring/chain algorithms (bandwidth-optimal).
    Ring,
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Algorithm::Auto),
            "direct" => Ok(Algorithm::Direct),
            "ring" => Ok(Algorithm::Ring),
            o => Err(format!("unknown algorithm {o:?} (auto, direct, ring)")),
        }
    }
}

/// Tuning of a communicator. Every rank must use the same values (they decide the algorithm
/// and the chunking, hence the frames each rank expects).
#[derive(Clone, Debug)]
pub struct CommConfig {
    /// Longest any one operation may take; past it every rank returns an error.
    pub timeout: Duration,
    /// Bytes per frame of the pipelined algorithms.
    pub chunk_bytes: usize,
    /// Under `Auto`, messages of `bytes` per rank use the direct algorithms while
    /// `(world_size - 1) × bytes` (what a rank sends directly) is at most this.
    pub small_max_bytes: usize,
    /// Algorithm selection.
    pub algorithm: Algorithm,
}

impl Default for CommConfig {
    fn default() -> Self {
        // small_max_bytes: the direct/ring crossover measured with `collective-rank
        // allreduce-bench --algorithm direct|ring` (N=2: ~192 KiB, N=4: ~64 KiB; bench-results/allreduce.md).
        CommConfig {
            timeout: Duration::from_secs(60),
            chunk_bytes: 1 << 20,
            small_max_bytes: 192 << 10,
            algorithm: Algorithm::Auto,
        }
    }
}

/// A group of ranks that run collectives together.
///
/// Every rank must call the same operations in the same order with matching arguments;
/// a mismatch is reported on every rank as [`Error::Mismatch`]. Any error poisons the
/// communicator (later calls return [`Error::Poisoned`]); form a new one to go on.
pub struct Communicator {
    transport: Box<dyn Transport>,
    config: CommConfig,
    /// Sequence number of the next operation.
    seq: u64,
    scratch: Scratch,
    /// Message of the error that poisoned this communicator.
    failed: Option<String>,
}

impl Communicator {
    /// Wraps a connected transport (TCP from [`crate::connect`], or in-memory in tests).
    pub fn new(transport: Box<dyn Transport>, config: CommConfig) -> Communicator {
        Communicator {
            transport,
            config,
            seq: 0,
            scratch: Scratch::default(),
            failed: None,
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.transport.world_size()
    }

    /// The configuration in use.
    pub fn config(&self) -> &CommConfig {
        &self.config
    }

    /// Sequence number the next operation will carry.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Payload bytes this rank has read straight from the memory of peers on its host so far
    /// (see [`crate::transport::tcp::TcpOptions::peer_copy`]); the rest went through sockets.
    pub fn peer_copied_bytes(&self) -> u64 {
        self.transport.peer_copied_bytes()
    }

    fn use_direct(&self, bytes: usize) -> bool {
        match self.config.algorithm {
            Algorithm::Direct => true,
            Algorithm::Ring => false,
            Algorithm::Auto => {
                bytes.saturating_mul(self.world_size() - 1) <= self.config.small_max_bytes
            }
        }
    }

    /// Runs one operation: numbers it, bounds it, and on failure tells the peers and poisons.
    fn run<R>(
        &mut self,
        mut op: OpDesc,
        f: impl FnOnce(&mut Ctx, &mut Scratch) -> Result<R>,
    ) -> Result<R> {
        if let Some(msg) = &self.failed {
            return Err(Error::Poisoned(msg.clone()));
        }
        op.seq = self.seq;
        self.seq += 1;
        let mut ctx = Ctx {
            t: self.transport.as_mut(),
            op,
            deadline: Deadline::after(self.config.timeout),
            chunk_bytes: self.config.chunk_bytes,
        };
        let result = f(&mut ctx, &mut self.scratch);
        if let Err(e) = &result {
            let reason = match e {
                // Pass the first rank's message on unchanged, so every rank blames the same one.
                Error::PeerAborted { reason, .. } => reason.clone(),
                e => format!("rank {}: {e}", self.transport.rank()),
            };
            self.transport.abort(op.seq, e.culprit(), &reason);
            self.failed = Some(e.to_string());
        }
        result
    }

    fn desc<T: Element>(
        kind: OpKind,
        reduce: Option<ReduceOp>,
        count: usize,
        root: usize,
    ) -> OpDesc {
        OpDesc {
            seq: 0,
            kind,
            dtype: T::DTYPE,
            reduce,
            count: count as u64,
            root: root as u32,
        }
    }

    /// Checks, with one exchange between every pair of ranks, that every rank is making the
    /// same call (used by backends whose data does not travel through this communicator,
    /// such as NCCL, so that mismatches are still reported on every rank).
    pub fn agree(
        &mut self,
        kind: OpKind,
        dtype: crate::dtype::DType,
        reduce: Option<ReduceOp>,
        count: usize,
        root: usize,
    ) -> Result<()> {
        let op = OpDesc {
            seq: 0,
            kind,
            dtype,
            reduce,
            count: count as u64,
            root: root as u32,
        };
        self.run(op, |ctx, s| ctx.announce(&mut s.pool))
    }

    /// Reduces `buf` over all ranks in place: afterwards every rank holds the same result.
    pub fn allreduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let direct = self.use_direct(std::mem::size_of_val(buf));
        self.run(
            Self::desc::<T>(OpKind::AllReduce, Some(op), buf.len(), 0),
            |ctx, s| {
                if direct {
                    algo::allreduce_direct(ctx, s, buf, op)
                } else {
                    algo::allreduce_ring(ctx, s, buf, op)
                }
            },
        )
    }

    /// Out-of-place allreduce: `recv` gets the reduction of every rank's `send`.
    pub fn allreduce_into<T: Element>(
        &mut self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        check_len("allreduce recv", recv.len(), send.len())?;
        recv.copy_from_slice(send);
        self.allreduce(recv, op)
    }

    /// Copies `root`'s `buf` into every rank's `buf`.
    pub fn broadcast<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} is not a rank of {}",
                self.world_size()
            )));
        }
        let direct = self.use_direct(std::mem::size_of_val(buf));
        self.run(
            Self::desc::<T>(OpKind::Broadcast, None, buf.len(), root),
            |ctx, s| {
                if direct {
                    algo::broadcast_direct(ctx, s, buf, root)
                } else {
                    algo::broadcast_chain(ctx, s, buf, root)
                }
            },
        )
    }

    /// Gathers every rank's `send` into `recv` (`world_size × send.len()`, in rank order).
    pub fn allgather<T: Element>(&mut self, send: &[T], recv: &mut [T]) -> Result<()> {
        let (me, n, count) = (self.rank(), self.world_size(), send.len());
        check_len("allgather recv", recv.len(), n * count)?;
        recv[me * count..(me + 1) * count].copy_from_slice(send);
        self.allgather_in_place(recv)
    }

    /// In-place allgather: block `rank` of `buf` (length `world_size × block`) is this rank's
    /// contribution; afterwards `buf` holds every rank's block.
    pub fn allgather_in_place<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        let n = self.world_size();
        if !buf.len().is_multiple_of(n) {
            return Err(Error::InvalidArgument(format!(
                "allgather buffer of {} elements is not {n} equal blocks",
                buf.len()
            )));
        }
        let direct = self.use_direct(std::mem::size_of_val(buf) / n);
        self.run(
            Self::desc::<T>(OpKind::AllGather, None, buf.len() / n, 0),
            |ctx, s| {
                if direct {
                    algo::allgather_direct(ctx, s, buf)
                } else {
                    algo::allgather_ring(ctx, s, buf)
                }
            },
        )
    }

    /// Reduces every rank's `send` (`world_size × recv.len()` elements) and gives rank `r`
    /// block `r` of the result in `recv`.
    pub fn reduce_scatter<T: Element>(
        &mut self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.world_size();
        check_len("reduce_scatter send", send.len(), n * recv.len())?;
        let direct = self.use_direct(std::mem::size_of_val(send));
        self.run(
            Self::desc::<T>(OpKind::ReduceScatter, Some(op), recv.len(), 0),
            |ctx, s| {
                if direct {
                    algo::reduce_scatter_direct(ctx, s, send, recv, op)
                } else {
                    algo::reduce_scatter_ring(ctx, s, send, recv, op)
                }
            },
        )
    }

    /// Returns once every rank has called `barrier`.
    pub fn barrier(&mut self) -> Result<()> {
        self.run(OpDesc::barrier(0), algo::barrier)
    }

    /// Allreduces many tensors as fused buckets of at most `bucket_bytes` (as Horovod and
    /// DDP do): consecutive tensors are packed into one buffer, reduced with one operation,
    /// and copied back. A tensor larger than a bucket is reduced on its own, in place. Bucket
    /// boundaries depend only on the tensor sizes, so every rank forms the same buckets.
    pub fn allreduce_fused<T: Element>(
        &mut self,
        tensors: &mut [&mut [T]],
        op: ReduceOp,
        bucket_bytes: usize,
    ) -> Result<()> {
        let cap = (bucket_bytes / std::mem::size_of::<T>()).max(1);
        let mut fusion = std::mem::take(&mut self.scratch.fusion);
        let result = (|| {
            let mut i = 0;
            while i < tensors.len() {
                if tensors[i].len() >= cap {
                    self.allreduce(tensors[i], op)?;
                    i += 1;
                    continue;
                }
                let mut end = i;
                let mut total = 0;
                while end < tensors.len() && total + tensors[end].len() <= cap {
                    total += tensors[end].len();
                    end += 1;
                }
                let bucket = typed::<T>(&mut fusion, total);
                let mut at = 0;
                for t in &tensors[i..end] {
                    bucket[at..at + t.len()].copy_from_slice(t);
                    at += t.len();
                }
                self.allreduce(bucket, op)?;
                let mut at = 0;
                for t in tensors[i..end].iter_mut() {
                    let len = t.len();
                    t.copy_from_slice(&bucket[at..at + len]);
                    at += len;
                }
                i = end;
            }
            Ok(())
        })();
        self.scratch.fusion = fusion;
        result
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::InvalidArgument(format!(
            "{what} has {got} elements, expected {want}"
        )));
    }
    Ok(())
}
