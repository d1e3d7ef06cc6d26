//! The collectives behind `ParasyncComm`: [`Communicator`] calls on C buffers in place,
//! typed by a `ParasyncDtype` code.

use std::ffi::{c_char, c_void};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use parasync_collective::{connect, AuthToken, with_element, CommConfig, Communicator, ConnectOptions, JoinSpec, TcpOptions};

use crate::args::{self, Region};
use crate::dtype::{ParasyncDtype, ParasyncReduceOp};
use crate::error::{guard, Error, ParasyncStatus, Result};

/// The ranks of a job that run collectives together (opaque).
///
/// Every rank must call the same operations in the same order with matching arguments; a
/// mismatch fails on every rank with `PARASYNC_STATUS_PEER`. Any failure leaves the
/// communicator unusable (`PARASYNC_STATUS_POISONED` afterwards): free it and connect anew.
/// Calls from several threads on one communicator are serialized (the order between them is
/// then up to chance, which other ranks cannot follow: use one thread per communicator).
pub struct ParasyncComm {
    /// Fixed at connection, so the getters need not wait for an operation in flight.
    rank: usize,
    world_size: usize,
    comm: Mutex<Communicator>,
}

impl ParasyncComm {
    fn new(comm: Communicator) -> ParasyncComm {
        ParasyncComm { rank: comm.rank(), world_size: comm.world_size(), comm: Mutex::new(comm) }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Communicator>> {
        // Poisoned only by a panic inside an earlier call, which left it in an unknown state.
        self.comm.lock().map_err(|_| {
            parasync_collective::Error::Poisoned("an earlier call on this communicator panicked".into()).into()
        })
    }
}

/// The timeout of `timeout_ms`: 0 means the collectives' default.
fn timeout(timeout_ms: u64) -> Duration {
    match timeout_ms {
        0 => CommConfig::default().timeout,
        ms => Duration::from_millis(ms),
    }
}

/// Stores a new communicator in `*out` (set to NULL first).
///
/// # Safety
/// `out` is NULL (an error) or valid for writing a pointer.
unsafe fn connect_into(opts: &ConnectOptions, out: *mut *mut ParasyncComm) -> Result<()> {
    let out = args::out(out, "out")?;
    // SAFETY (both writes): checked non-null; valid by the caller's contract.
    unsafe { args::write(out, std::ptr::null_mut()) };
    let comm = ParasyncComm::new(connect(opts)?);
    unsafe { args::write(out, Box::into_raw(Box::new(comm))) };
    Ok(())
}

/// Joins a job of `world_size` ranks as `rank` and stores the communicator in `*out` (set to
/// NULL first, so it stays NULL on failure). Blocks until every rank has joined.
///
/// Rank 0 hosts the rendezvous at `master` (`"host:port"`); the others reach it there.
/// `token` is the job's shared secret (NULL: `"parasync"`, the default of the launcher
/// path). `timeout_ms` bounds the rendezvous and every later operation (0: 60 s).
///
/// # Safety
/// `master` (and `token` unless NULL) are NUL-terminated strings; `out` is valid for writing
/// a pointer.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_connect(
    rank: usize,
    world_size: usize,
    master: *const c_char,
    token: *const c_char,
    timeout_ms: u64,
    out: *mut *mut ParasyncComm,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_connect_impl(rank, world_size, master, token, timeout_ms, out) })
}

unsafe fn comm_connect_impl(
    rank: usize,
    world_size: usize,
    master: *const c_char,
    token: *const c_char,
    timeout_ms: u64,
    out: *mut *mut ParasyncComm,
) -> Result<()> {
    // SAFETY: the caller's contract.
    let (master, token) = unsafe {
        (args::string(master, "master")?, if token.is_null() { "parasync" } else { args::string(token, "token")? })
    };
    let timeout = timeout(timeout_ms);
    let opts = ConnectOptions {
        spec: JoinSpec {
            rank,
            world_size,
            master: master.to_string(),
            token: token.to_string(),
            auth_token: AuthToken::from_env().map_err(Error::usage)?,
            tls: parasync_collective::JobTls::from_env().map_err(Error::usage)?,
            timeout,
        },
        comm: CommConfig { timeout, ..CommConfig::default() },
        tcp: TcpOptions::default(),
        data_host: None,
    };
    // SAFETY: the caller's contract.
    unsafe { connect_into(&opts, out) }
}

/// Like `parasync_comm_connect`, with rank, world size, rendezvous address and job token
/// taken from the launcher's environment: `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`
/// (torchrun), `TF_CONFIG`, or Slurm's variables (`PARASYNC_MASTER_PORT` and
/// `PARASYNC_JOB_TOKEN` override). Fails with `PARASYNC_STATUS_ENV` when they describe no job.
///
/// # Safety
/// `out` is valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_from_env(timeout_ms: u64, out: *mut *mut ParasyncComm) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_from_env_impl(timeout_ms, out) })
}

unsafe fn comm_from_env_impl(timeout_ms: u64, out: *mut *mut ParasyncComm) -> Result<()> {
    let opts = ConnectOptions::from_env(timeout(timeout_ms))?;
    // SAFETY: the caller's contract.
    unsafe { connect_into(&opts, out) }
}

/// Closes the communicator's connections and frees it. NULL is ignored.
///
/// # Safety
/// `comm` is NULL or came from `parasync_comm_connect` / `parasync_comm_from_env`, was not
/// freed yet, and no call is using it.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_free(comm: *mut ParasyncComm) {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_free_impl(comm) });
}

unsafe fn comm_free_impl(comm: *mut ParasyncComm) -> Result<()> {
    if !comm.is_null() {
        // SAFETY: the caller's contract: ours, from `Box::into_raw`, freed once.
        drop(unsafe { Box::from_raw(comm) });
    }
    Ok(())
}

/// Stores this process's rank in `*out`.
///
/// # Safety
/// `comm` is a live communicator; `out` is valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_rank(comm: *const ParasyncComm, out: *mut usize) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_rank_impl(comm, out) })
}

unsafe fn comm_rank_impl(comm: *const ParasyncComm, out: *mut usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        let (comm, out) = (args::handle(comm, "comm")?, args::out(out, "out")?);
        args::write(out, comm.rank);
    }
    Ok(())
}

/// Stores the number of ranks in `*out`.
///
/// # Safety
/// `comm` is a live communicator; `out` is valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_size(comm: *const ParasyncComm, out: *mut usize) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_size_impl(comm, out) })
}

unsafe fn comm_size_impl(comm: *const ParasyncComm, out: *mut usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        let (comm, out) = (args::handle(comm, "comm")?, args::out(out, "out")?);
        args::write(out, comm.world_size);
    }
    Ok(())
}

/// `count × world_size`, or a usage error naming `what`.
fn times_world(count: usize, world_size: usize, what: &str) -> Result<usize> {
    count
        .checked_mul(world_size)
        .ok_or_else(|| Error::usage(format!("{what}: {count} elements per rank × {world_size} ranks overflow")))
}

/// Reduces `buf` (`count` elements of `dtype`) over all ranks in place with `op`; afterwards
/// every rank holds the same result (bitwise identical across runs).
///
/// # Safety
/// `buf` is valid for reading and writing `count` elements of `dtype` (or is NULL when
/// `count` is 0); `comm` is a live communicator.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_allreduce(
    comm: *const ParasyncComm,
    buf: *mut c_void,
    count: usize,
    dtype: ParasyncDtype,
    op: ParasyncReduceOp,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_allreduce_impl(comm, buf, count, dtype, op) })
}

unsafe fn comm_allreduce_impl(
    comm: *const ParasyncComm,
    buf: *mut c_void,
    count: usize,
    dtype: ParasyncDtype,
    op: ParasyncReduceOp,
) -> Result<()> {
    // SAFETY: the caller's contract.
    let comm = unsafe { args::handle(comm, "comm")? };
    let (dtype, op) = (dtype.to_comm("dtype")?, op.to_comm()?);
    with_element!(dtype, T => {
        // SAFETY: the caller's contract.
        let buf = unsafe { args::slice_mut(buf.cast::<T>(), count, "buf")? };
        Ok(comm.lock()?.allreduce(buf, op)?)
    })
}

/// Copies rank `root`'s `buf` (`count` elements of `dtype`) into every rank's `buf`.
///
/// # Safety
/// As for `parasync_comm_allreduce`.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_broadcast(
    comm: *const ParasyncComm,
    buf: *mut c_void,
    count: usize,
    dtype: ParasyncDtype,
    root: usize,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_broadcast_impl(comm, buf, count, dtype, root) })
}

unsafe fn comm_broadcast_impl(comm: *const ParasyncComm, buf: *mut c_void, count: usize, dtype: ParasyncDtype, root: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    let comm = unsafe { args::handle(comm, "comm")? };
    with_element!(dtype.to_comm("dtype")?, T => {
        // SAFETY: the caller's contract.
        let buf = unsafe { args::slice_mut(buf.cast::<T>(), count, "buf")? };
        Ok(comm.lock()?.broadcast(buf, root)?)
    })
}

/// Gathers every rank's `send` (`count` elements of `dtype`) into `recv`, which holds
/// `count × world_size` elements in rank order. `send` and `recv` may not overlap.
///
/// # Safety
/// `send` is valid for reading `count` elements and `recv` for writing `count × world_size`
/// elements of `dtype` (either may be NULL when its length is 0); `comm` is a live
/// communicator.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_allgather(
    comm: *const ParasyncComm,
    send: *const c_void,
    count: usize,
    recv: *mut c_void,
    dtype: ParasyncDtype,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_allgather_impl(comm, send, count, recv, dtype) })
}

unsafe fn comm_allgather_impl(comm: *const ParasyncComm, send: *const c_void, count: usize, recv: *mut c_void, dtype: ParasyncDtype) -> Result<()> {
    // SAFETY: the caller's contract.
    let comm = unsafe { args::handle(comm, "comm")? };
    let recv_count = times_world(count, comm.world_size, "allgather recv")?;
    with_element!(dtype.to_comm("dtype")?, T => {
        let (send, recv) = (send.cast::<T>(), recv.cast::<T>());
        args::disjoint(vec![
            Region::of(send, count, false, "send".into()),
            Region::of(recv, recv_count, true, "recv".into()),
        ])?;
        // SAFETY: the caller's contract; an overlap was refused above.
        let (send, recv) = unsafe { (args::slice(send, count, "send")?, args::slice_mut(recv, recv_count, "recv")?) };
        Ok(comm.lock()?.allgather(send, recv)?)
    })
}

/// Reduces every rank's `send` (`recv_count × world_size` elements of `dtype`) with `op` and
/// gives rank `r` block `r` of the result in `recv` (`recv_count` elements). `send` and
/// `recv` may not overlap.
///
/// # Safety
/// `send` is valid for reading `recv_count × world_size` elements and `recv` for writing
/// `recv_count` elements of `dtype` (either may be NULL when its length is 0); `comm` is a
/// live communicator.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_reduce_scatter(
    comm: *const ParasyncComm,
    send: *const c_void,
    recv: *mut c_void,
    recv_count: usize,
    dtype: ParasyncDtype,
    op: ParasyncReduceOp,
) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_reduce_scatter_impl(comm, send, recv, recv_count, dtype, op) })
}

unsafe fn comm_reduce_scatter_impl(
    comm: *const ParasyncComm,
    send: *const c_void,
    recv: *mut c_void,
    recv_count: usize,
    dtype: ParasyncDtype,
    op: ParasyncReduceOp,
) -> Result<()> {
    // SAFETY: the caller's contract.
    let comm = unsafe { args::handle(comm, "comm")? };
    let send_count = times_world(recv_count, comm.world_size, "reduce_scatter send")?;
    let (dtype, op) = (dtype.to_comm("dtype")?, op.to_comm()?);
    with_element!(dtype, T => {
        let (send, recv) = (send.cast::<T>(), recv.cast::<T>());
        args::disjoint(vec![
            Region::of(send, send_count, false, "send".into()),
            Region::of(recv, recv_count, true, "recv".into()),
        ])?;
        // SAFETY: the caller's contract; an overlap was refused above.
        let (send, recv) = unsafe { (args::slice(send, send_count, "send")?, args::slice_mut(recv, recv_count, "recv")?) };
        Ok(comm.lock()?.reduce_scatter(send, recv, op)?)
    })
}

/// Returns once every rank has called `parasync_comm_barrier`.
///
/// # Safety
/// `comm` is a live communicator.
#[no_mangle]
pub unsafe extern "C" fn parasync_comm_barrier(comm: *const ParasyncComm) -> ParasyncStatus {
    // SAFETY: the caller's contract.
    guard(|| unsafe { comm_barrier_impl(comm) })
}

unsafe fn comm_barrier_impl(comm: *const ParasyncComm) -> Result<()> {
    // SAFETY: the caller's contract.
    let comm = unsafe { args::handle(comm, "comm")? };
    Ok(comm.lock()?.barrier()?)
}
