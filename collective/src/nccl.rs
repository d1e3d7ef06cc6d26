//! NCCL backend (feature `nccl`): the same collectives on device buffers, through `cudarc`.
//!
//! `libcuda` and `libnccl.so` are loaded at run time, so the crate builds (and its tests run,
//! skipping) on machines without a GPU; [`unavailable_reason`] says why a GPU cannot be used.
//! Ranks meet through the same gRPC rendezvous as the TCP backend: rank 0 creates the NCCL
//! unique id and publishes it there. Every rank keeps a TCP [`Communicator`] beside NCCL as
//! its control plane: before each NCCL call the ranks check with it that they make the same
//! call (a mismatch is an [`Error::Mismatch`] on every rank, not a hang), and every call
//! waits for completion at most the configured timeout. One rank per GPU.

use crate::comm::Communicator;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::frame::OpKind;
use crate::rendezvous::{connect_with_blob, ConnectOptions, RendezvousHost};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{Comm, Id, NcclType};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// bf16 as device buffers hold it (`half::bf16`, same bits as [`crate::Bf16`]).
pub use half::bf16 as DeviceBf16;

/// Element types NCCL reduces: `f32`, bf16 ([`DeviceBf16`]), `f64`, `i32`, `i64`.
pub trait NcclElement:
    NcclType + DeviceRepr + ValidAsZeroBits + Copy + Default + Send + 'static
{
    /// The matching dtype tag (for the cross-rank call check).
    const DTYPE: DType;
}

impl NcclElement for f32 {
    const DTYPE: DType = DType::F32;
}
impl NcclElement for f64 {
    const DTYPE: DType = DType::F64;
}
impl NcclElement for i32 {
    const DTYPE: DType = DType::I32;
}
impl NcclElement for i64 {
    const DTYPE: DType = DType::I64;
}
impl NcclElement for DeviceBf16 {
    const DTYPE: DType = DType::Bf16;
}

/// Why NCCL cannot run here (no driver, no `libnccl.so`, no device), or `None` if it can.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: only tries to open the shared libraries; no symbol is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver library (libcuda.so) on this machine".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Some(
            "libnccl.so not found on the loader path (see scripts/gpu-smoke.sh)".into(),
        );
    }
    match CudaContext::device_count() {
        Ok(0) => Some("the CUDA driver sees no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("the CUDA driver failed: {e}")),
    }
}

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::Nccl(format!("{what}: {:?}", e.0))
}

fn cuda_err(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Nccl(format!("{what}: {e}"))
}

fn nccl_op(op: ReduceOp) -> cudarc::nccl::ReduceOp {
    match op {
        ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
        ReduceOp::Avg => cudarc::nccl::ReduceOp::Avg,
        ReduceOp::Min => cudarc::nccl::ReduceOp::Min,
        ReduceOp::Max => cudarc::nccl::ReduceOp::Max,
    }
}

/// A rank of an NCCL communicator on one GPU.
pub struct NcclCommunicator {
    // Field order matters: the NCCL communicator is aborted before its stream and context go.
    comm: Comm,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    control: Communicator,
    timeout: Duration,
    /// Whether each call is checked against the other ranks' calls first.
    checked: bool,
    /// Set when a call failed: NCCL's state is then unknown and the communicator unusable.
    failed: Option<String>,
}

impl NcclCommunicator {
    /// Meets the other ranks (rank 0 hosts the rendezvous, on `host` if given) and forms an
    /// NCCL communicator on GPU `device`.
    pub fn connect(
        opts: &ConnectOptions,
        host: Option<RendezvousHost>,
        device: usize,
    ) -> Result<NcclCommunicator> {
        if let Some(why) = unavailable_reason() {
            return Err(Error::Nccl(why));
        }
        let ctx =
            CudaContext::new(device).map_err(|e| cuda_err(&format!("opening GPU {device}"), e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating a stream", e))?;
        let blob = if opts.spec.rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let (control, blob) = connect_with_blob(opts, host, blob)?;
        let internal: [std::ffi::c_char; 128] = blob
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| {
                Error::Rendezvous(format!(
                    "NCCL unique id of {} bytes from rank 0, expected 128",
                    blob.len()
                ))
            })?;
        // NCCL binds the communicator to the current device: make it this rank's GPU.
        ctx.bind_to_thread()
            .map_err(|e| cuda_err("binding the GPU to this thread", e))?;
        let comm = Comm::from_rank(
            stream.clone(),
            opts.spec.rank,
            opts.spec.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| {
            let version = cudarc::nccl::result::get_nccl_version().map_or_else(|_| "unknown".into(), |v| v.to_string());
            nccl_err(&format!("ncclCommInitRank (rank {} of {}, GPU {device}, NCCL version {version})", opts.spec.rank, opts.spec.world_size), e)
        })?;

        Ok(NcclCommunicator {
            comm,
            stream,
            ctx,
            control,
            timeout: opts.comm.timeout,
            checked: true,
            failed: None,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The stream NCCL work is queued on (allocate and copy buffers on it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context of this rank's GPU.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Turns the per-call cross-rank check off (saves one small TCP exchange per call; a
    /// mismatched call then hangs in NCCL until the timeout instead of failing fast).
    pub fn set_checked(&mut self, checked: bool) {
        self.checked = checked;
    }

    fn agree<T: NcclElement>(
        &mut self,
        kind: OpKind,
        reduce: Option<ReduceOp>,
        count: usize,
        root: usize,
    ) -> Result<()> {
        if let Some(msg) = &self.failed {
            return Err(Error::Poisoned(msg.clone()));
        }
        if self.checked {
            if let Err(e) = self.control.agree(kind, T::DTYPE, reduce, count, root) {
                self.failed = Some(e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Marks the communicator unusable after `e` and returns it.
    fn poison(&mut self, e: Error) -> Error {
        // Name this rank: NCCL's own codes (ncclInvalidUsage, …) say nothing of where.
        let e = match e {
            Error::Nccl(m) => Error::Nccl(format!("rank {} of {}: {m}", self.rank(), self.world_size())),
            other => other,
        };
        self.failed = Some(e.to_string());
        e
    }

    /// Waits until the queued work is done, at most the timeout; a failure poisons.
    fn finish(&mut self, what: &str) -> Result<()> {
        let r = self.wait_done(what);
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    fn wait_done(&self, what: &str) -> Result<()> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| cuda_err("recording an event", e))?;
        let start = Instant::now();
        let until = start + self.timeout;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                // Busy-poll at first (short operations), then sleep between looks.
                Ok(false) if start.elapsed() < Duration::from_millis(2) => std::hint::spin_loop(),
                Ok(false) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_micros(50))
                }
                Ok(false) => {
                    return Err(Error::Nccl(format!(
                        "{what} did not complete within {:?} (a rank died or stalled?)",
                        self.timeout
                    )))
                }
                Err(e) => return Err(cuda_err(what, e)),
            }
        }
    }

    /// Allreduce in place on the device.
    pub fn allreduce<T: NcclElement>(
        &mut self,
        buf: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<()> {
        self.agree::<T>(OpKind::AllReduce, Some(op), buf.len(), 0)?;
        self.comm
            .all_reduce_in_place(buf, &nccl_op(op))
            .map_err(|e| self.poison(nccl_err("ncclAllReduce", e)))?;
        self.finish("allreduce")
    }

    /// Out-of-place allreduce.
    pub fn allreduce_into<T: NcclElement>(
        &mut self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<()> {
        if send.len() != recv.len() {
            return Err(Error::InvalidArgument(format!(
                "allreduce of {} into {} elements",
                send.len(),
                recv.len()
            )));
        }
        self.agree::<T>(OpKind::AllReduce, Some(op), send.len(), 0)?;
        self.comm
            .all_reduce(send, recv, &nccl_op(op))
            .map_err(|e| self.poison(nccl_err("ncclAllReduce", e)))?;
        self.finish("allreduce")
    }

    /// Broadcast of `root`'s buffer, in place.
    pub fn broadcast<T: NcclElement>(&mut self, buf: &mut CudaSlice<T>, root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} is not a rank of {}",
                self.world_size()
            )));
        }
        self.agree::<T>(OpKind::Broadcast, None, buf.len(), root)?;
        self.comm
            .broadcast_in_place(buf, root as i32)
            .map_err(|e| self.poison(nccl_err("ncclBroadcast", e)))?;
        self.finish("broadcast")
    }

    /// Allgather: `recv` (world × send.len()) gets every rank's `send` in rank order.
    pub fn allgather<T: NcclElement>(
        &mut self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<()> {
        if recv.len() != send.len() * self.world_size() {
            return Err(Error::InvalidArgument(format!(
                "allgather recv has {} elements, expected {}",
                recv.len(),
                send.len() * self.world_size()
            )));
        }
        self.agree::<T>(OpKind::AllGather, None, send.len(), 0)?;
        self.comm
            .all_gather(send, recv)
            .map_err(|e| self.poison(nccl_err("ncclAllGather", e)))?;
        self.finish("allgather")
    }

    /// Reduce-scatter: rank `r` gets block `r` of the reduction of every rank's `send`.
    pub fn reduce_scatter<T: NcclElement>(
        &mut self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<()> {
        if send.len() != recv.len() * self.world_size() {
            return Err(Error::InvalidArgument(format!(
                "reduce_scatter send has {} elements, expected {}",
                send.len(),
                recv.len() * self.world_size()
            )));
        }
        self.agree::<T>(OpKind::ReduceScatter, Some(op), recv.len(), 0)?;
        self.comm
            .reduce_scatter(send, recv, &nccl_op(op))
            .map_err(|e| self.poison(nccl_err("ncclReduceScatter", e)))?;
        self.finish("reduce_scatter")
    }

    /// Waits until every rank has called `barrier` (over the control plane).
    pub fn barrier(&mut self) -> Result<()> {
        self.control.barrier()
    }
}
