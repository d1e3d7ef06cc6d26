//! `parasync._native.Communicator` and `Work`: the collectives on NumPy arrays in place.
//!
//! Blocking calls run on the calling thread with the GIL released, after any operation
//! started with an `_async` call ([`BackgroundCommunicator::run`]); `_async` calls run on the
//! communicator's thread and return a [`Work`] that holds the arrays until it is waited for.

use parasync_collective::AuthToken;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use parasync_collective::{
    connect, BackgroundCommunicator, CommConfig, ConnectOptions, Handle, JoinSpec, ReduceOp, TcpOptions,
};
use pyo3::exceptions::{PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use parasync_collective::with_element;

use crate::arrays::{collective_view, RawView};
use crate::errors::comm_error;

fn reduce_op(op: &str) -> PyResult<ReduceOp> {
    ReduceOp::ALL
        .into_iter()
        .find(|o| o.name() == op)
        .ok_or_else(|| PyValueError::new_err(format!("unknown reduce op {op:?} (sum, avg, min, max)")))
}

fn timeout(seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| PyValueError::new_err(format!("timeout must be a positive number of seconds, got {seconds}")))
}

/// One collective, ready to run on either thread: the views it uses and what it does.
#[derive(Clone, Copy)]
enum Op {
    AllReduce(RawView, ReduceOp),
    Broadcast(RawView, usize),
    AllGather(RawView, RawView),
    ReduceScatter(RawView, RawView, ReduceOp),
    Barrier,
}

impl Op {
    /// Runs the operation.
    ///
    /// # Safety
    /// The views' arrays are alive and untouched by anyone else until this returns.
    unsafe fn run(self, c: &mut parasync_collective::Communicator) -> parasync_collective::Result<()> {
        match self {
            Op::AllReduce(v, op) => with_element!(v.dtype, T => c.allreduce(v.slice_mut::<T>(), op)),
            Op::Broadcast(v, root) => with_element!(v.dtype, T => c.broadcast(v.slice_mut::<T>(), root)),
            Op::AllGather(s, r) => with_element!(s.dtype, T => c.allgather(s.slice::<T>(), r.slice_mut::<T>())),
            Op::ReduceScatter(s, r, op) => {
                with_element!(s.dtype, T => c.reduce_scatter(s.slice::<T>(), r.slice_mut::<T>(), op))
            }
            Op::Barrier => c.barrier(),
        }
    }
}

/// A group of ranks running collectives together (see `parasync.Communicator`).
#[pyclass(module = "parasync._native", frozen)]
pub struct Communicator {
    /// `None` once closed.
    inner: Mutex<Option<std::sync::Arc<BackgroundCommunicator>>>,
    rank: usize,
    size: usize,
}

impl Communicator {
    fn from_options(py: Python<'_>, opts: ConnectOptions) -> PyResult<Communicator> {
        let comm = py.detach(|| connect(&opts)).map_err(|e| comm_error(py, e))?;
        let (rank, size) = (comm.rank(), comm.world_size());
        Ok(Communicator { inner: Mutex::new(Some(std::sync::Arc::new(BackgroundCommunicator::new(comm)))), rank, size })
    }

    fn bg(&self) -> PyResult<std::sync::Arc<BackgroundCommunicator>> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| PyValueError::new_err("the communicator is closed"))
    }

    /// Runs `op` on the calling thread without the GIL.
    fn blocking(&self, py: Python<'_>, op: Op) -> PyResult<()> {
        let bg = self.bg()?;
        // SAFETY: the arrays behind the views are borrowed by the caller's frame (alive) and,
        // with the GIL released, only this operation touches them until it returns.
        py.detach(|| bg.run(|c| unsafe { op.run(c) })).map_err(|e| comm_error(py, e))
    }

    /// Starts `op` on the communicator's thread; the returned work holds `keep` alive.
    fn start(&self, op: Op, keep: Vec<Py<PyAny>>, result: Py<PyAny>) -> PyResult<Work> {
        let bg = self.bg()?;
        struct Sendable(Op);
        // SAFETY: the views are raw addresses of arrays that `Work` keeps alive until the
        // operation is over; the caller hands them over until `wait()`.
        unsafe impl Send for Sendable {}
        let job = Sendable(op);
        let handle = bg.submit(move |c| {
            let job = job;
            unsafe { job.0.run(c) }
        });
        Ok(Work { state: Mutex::new(WorkState::Running(handle)), keep, result })
    }

    fn allgather_op(&self, send: &Bound<'_, PyAny>, recv: &Bound<'_, PyAny>) -> PyResult<Op> {
        let s = collective_view(send, "allgather: send", false)?;
        let r = collective_view(recv, "allgather: recv", true)?;
        check_pair(&s, &r, "allgather", s.len * self.size, r.len, "world_size × len(send)")?;
        Ok(Op::AllGather(s, r))
    }

    fn reduce_scatter_op(&self, send: &Bound<'_, PyAny>, recv: &Bound<'_, PyAny>, op: &str) -> PyResult<Op> {
        let s = collective_view(send, "reduce_scatter: send", false)?;
        let r = collective_view(recv, "reduce_scatter: recv", true)?;
        check_pair(&s, &r, "reduce_scatter", r.len * self.size, s.len, "world_size × len(recv)")?;
        Ok(Op::ReduceScatter(s, r, reduce_op(op)?))
    }

    fn broadcast_op(&self, array: &Bound<'_, PyAny>, root: usize) -> PyResult<Op> {
        if root >= self.size {
            return Err(PyValueError::new_err(format!("broadcast: root {root} is not a rank of {}", self.size)));
        }
        Ok(Op::Broadcast(collective_view(array, "broadcast: array", true)?, root))
    }
}

/// Send and receive buffers of one operation: same dtype, sizes that fit, no shared memory.
fn check_pair(s: &RawView, r: &RawView, what: &str, want: usize, got: usize, rule: &str) -> PyResult<()> {
    if s.dtype != r.dtype {
        return Err(PyValueError::new_err(format!(
            "{what}: send is {}, recv is {}",
            s.dtype.name(),
            r.dtype.name()
        )));
    }
    if want != got {
        return Err(PyValueError::new_err(format!("{what}: sizes must satisfy {rule} (got {want} and {got} elements)")));
    }
    s.check_apart(r, what)
}

#[pymethods]
impl Communicator {
    /// Joins the job: rank 0 hosts the rendezvous at `master` (`host:port`), every rank
    /// meets there and connects to the others.
    #[new]
    #[pyo3(signature = (rank, size, master, timeout=60.0, token=None, auth_token=None))]
    fn new(
        py: Python<'_>,
        rank: usize,
        size: usize,
        master: String,
        timeout: f64,
        token: Option<String>,
        auth_token: Option<&str>,
    ) -> PyResult<Self> {
        let t = self::timeout(timeout)?;
        let token = token.or_else(|| std::env::var("PARASYNC_JOB_TOKEN").ok()).unwrap_or_default();
        let auth_token = match crate::errors::auth_token(auth_token)? {
            Some(a) => Some(a),
            None => AuthToken::from_env().map_err(PyValueError::new_err)?,
        };
        let opts = ConnectOptions {
            spec: JoinSpec {
                rank,
                world_size: size,
                master,
                token,
                auth_token,
                tls: parasync_collective::JobTls::from_env().map_err(PyValueError::new_err)?,
                timeout: t,
            },
            comm: CommConfig { timeout: t, ..CommConfig::default() },
            tcp: TcpOptions::default(),
            data_host: None,
        };
        Self::from_options(py, opts)
    }

    /// A communicator for the job the launcher's environment describes (torchrun,
    /// `TF_CONFIG`, Slurm).
    #[staticmethod]
    #[pyo3(signature = (timeout=60.0))]
    fn from_env(py: Python<'_>, timeout: f64) -> PyResult<Self> {
        let opts = ConnectOptions::from_env(self::timeout(timeout)?).map_err(|e| comm_error(py, e))?;
        Self::from_options(py, opts)
    }

    /// This process's rank.
    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    #[getter]
    fn size(&self) -> usize {
        self.size
    }

    /// Reduces `array` over every rank, in place.
    #[pyo3(signature = (array, op="sum"))]
    fn allreduce<'py>(&self, py: Python<'py>, array: Bound<'py, PyAny>, op: &str) -> PyResult<Bound<'py, PyAny>> {
        let v = collective_view(&array, "allreduce: array", true)?;
        self.blocking(py, Op::AllReduce(v, reduce_op(op)?))?;
        Ok(array)
    }

    /// Copies `root`'s `array` into every rank's, in place.
    #[pyo3(signature = (array, root=0))]
    fn broadcast<'py>(&self, py: Python<'py>, array: Bound<'py, PyAny>, root: usize) -> PyResult<Bound<'py, PyAny>> {
        let op = self.broadcast_op(&array, root)?;
        self.blocking(py, op)?;
        Ok(array)
    }

    /// Gathers every rank's `send` into `recv` (`size × len(send)` elements, rank order).
    fn allgather<'py>(&self, py: Python<'py>, send: Bound<'py, PyAny>, recv: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let op = self.allgather_op(&send, &recv)?;
        self.blocking(py, op)?;
        Ok(recv)
    }

    /// Reduces `send` (`size × len(recv)` elements) over every rank; `recv` gets this
    /// rank's block.
    #[pyo3(signature = (send, recv, op="sum"))]
    fn reduce_scatter<'py>(&self, py: Python<'py>, send: Bound<'py, PyAny>, recv: Bound<'py, PyAny>, op: &str) -> PyResult<Bound<'py, PyAny>> {
        let op = self.reduce_scatter_op(&send, &recv, op)?;
        self.blocking(py, op)?;
        Ok(recv)
    }

    /// Returns once every rank has called it.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        self.blocking(py, Op::Barrier)
    }

    /// Starts an allreduce; `wait()` on the result gives `array` back, reduced.
    #[pyo3(signature = (array, op="sum"))]
    fn allreduce_async(&self, array: Bound<'_, PyAny>, op: &str) -> PyResult<Work> {
        let v = collective_view(&array, "allreduce: array", true)?;
        let a = array.unbind();
        self.start(Op::AllReduce(v, reduce_op(op)?), vec![], a)
    }

    /// Starts a broadcast.
    #[pyo3(signature = (array, root=0))]
    fn broadcast_async(&self, array: Bound<'_, PyAny>, root: usize) -> PyResult<Work> {
        let op = self.broadcast_op(&array, root)?;
        self.start(op, vec![], array.unbind())
    }

    /// Starts an allgather.
    fn allgather_async(&self, send: Bound<'_, PyAny>, recv: Bound<'_, PyAny>) -> PyResult<Work> {
        let op = self.allgather_op(&send, &recv)?;
        self.start(op, vec![send.unbind()], recv.unbind())
    }

    /// Starts a reduce_scatter.
    #[pyo3(signature = (send, recv, op="sum"))]
    fn reduce_scatter_async(&self, send: Bound<'_, PyAny>, recv: Bound<'_, PyAny>, op: &str) -> PyResult<Work> {
        let op = self.reduce_scatter_op(&send, &recv, op)?;
        self.start(op, vec![send.unbind()], recv.unbind())
    }

    /// Starts a barrier.
    fn barrier_async(&self, py: Python<'_>) -> PyResult<Work> {
        self.start(Op::Barrier, vec![], py.None())
    }

    /// Operations started and not finished yet.
    #[getter]
    fn pending(&self) -> PyResult<usize> {
        Ok(self.bg()?.pending())
    }

    /// Waits for the started operations, then closes the connections to the other ranks.
    fn close(&self, py: Python<'_>) {
        let bg = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Dropping the last reference joins the communicator's thread.
        py.detach(move || drop(bg));
    }
}

enum WorkState {
    Running(Handle<()>),
    /// Another thread is waiting on the handle (it puts it back or finishes).
    Waited,
    /// Over: `None` on success, else the error (raised by every `wait()`).
    Finished(Option<PyErr>),
}

/// A started collective (see `parasync.Work`).
#[pyclass(module = "parasync._native", frozen)]
pub struct Work {
    state: Mutex<WorkState>,
    /// Arrays the operation reads; kept alive until it is over.
    keep: Vec<Py<PyAny>>,
    /// What `wait()` returns: the array holding the result (None for a barrier).
    result: Py<PyAny>,
}

/// How often a waiting `Work` checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

type Polled = std::result::Result<parasync_collective::Result<()>, Handle<()>>;

impl Work {
    fn lock(&self) -> std::sync::MutexGuard<'_, WorkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the handle out to wait on it without holding the lock (the waiter needs the
    /// GIL back afterwards, which a thread blocked on this lock might hold).
    fn take_handle(&self) -> Option<Handle<()>> {
        let mut state = self.lock();
        match std::mem::replace(&mut *state, WorkState::Waited) {
            WorkState::Running(h) => Some(h),
            other => {
                *state = other;
                None
            }
        }
    }

    /// Puts back what waiting on the handle gave.
    fn put_back(&self, py: Python<'_>, polled: Polled) {
        *self.lock() = match polled {
            Ok(r) => WorkState::Finished(r.err().map(|e| comm_error(py, e))),
            Err(h) => WorkState::Running(h),
        };
    }

    /// The outcome if finished.
    fn finished(&self, py: Python<'_>) -> Option<PyResult<Py<PyAny>>> {
        match &*self.lock() {
            WorkState::Finished(None) => Some(Ok(self.result.clone_ref(py))),
            WorkState::Finished(Some(e)) => Some(Err(e.clone_ref(py))),
            _ => None,
        }
    }
}

#[pymethods]
impl Work {
    /// Blocks until the operation is over (or `timeout` seconds pass: `TimeoutError`, the
    /// operation goes on); returns its result array. Raises the operation's error.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let deadline = timeout.map(|t| Duration::try_from_secs_f64(t).map(|d| Instant::now() + d)).transpose();
        let deadline = deadline.map_err(|_| PyValueError::new_err("timeout must be a non-negative number of seconds"))?;
        loop {
            if let Some(outcome) = self.finished(py) {
                return outcome;
            }
            let step = deadline.map_or(SIGNAL_POLL, |d| d.saturating_duration_since(Instant::now()).min(SIGNAL_POLL));
            match self.take_handle() {
                Some(h) => {
                    let polled = py.detach(move || h.wait_timeout(step));
                    self.put_back(py, polled);
                }
                None => py.detach(|| std::thread::sleep(Duration::from_millis(1))),
            }
            if let Some(outcome) = self.finished(py) {
                return outcome;
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(PyTimeoutError::new_err("the collective is still running"));
            }
        }
    }

    /// True once the operation is over (successfully or not); never blocks.
    fn done(&self, py: Python<'_>) -> bool {
        if let Some(h) = self.take_handle() {
            self.put_back(py, h.try_wait());
        }
        matches!(*self.lock(), WorkState::Finished(_))
    }

    /// The arrays this operation holds (inputs and the result).
    #[getter]
    fn arrays(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.keep.iter().map(|a| a.clone_ref(py)).chain([self.result.clone_ref(py)]).collect()
    }
}

/// Rank, world size, master and source the launcher's environment describes.
#[pyfunction]
pub fn launch_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let l = parasync_collective::env::from_env().map_err(|e| comm_error(py, e))?;
    let d = PyDict::new(py);
    d.set_item("rank", l.rank)?;
    d.set_item("size", l.world_size)?;
    d.set_item("master", l.master)?;
    d.set_item("source", l.source)?;
    Ok(d)
}
