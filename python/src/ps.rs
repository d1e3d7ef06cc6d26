//! `parasync._native.PsClient`: the blocking parameter-server client on NumPy arrays.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use numpy::{PyArray2, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use parasync_client::{BlockingClient, ClientOptions, DType, ErrorKind, Init, Optimizer, VariableSpec};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySequence};

use crate::arrays;
use crate::errors::client_error;
use crate::tables::{self, SparsePushSummary, TableSpecTuple};

fn wire_dtype(name: &str, what: &str) -> PyResult<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::Bf16),
        o => Err(PyValueError::new_err(format!("{what} must be \"f32\" or \"bf16\", got {o:?}"))),
    }
}

fn seconds(s: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| PyValueError::new_err(format!("{what} must be a non-negative number of seconds, got {s}")))
}

/// Runs a blocking client call with the GIL released; Ctrl-C (any pending signal whose
/// handler raises) abandons it within [`parasync_client::blocking::INTERRUPT_POLL`].
fn blocking<T: Send>(
    py: Python<'_>,
    call: impl FnOnce(&mut dyn FnMut() -> bool) -> parasync_client::Result<T> + Send,
) -> PyResult<T> {
    let mut signal: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut stop = || match Python::attach(|py| py.check_signals()) {
            Ok(()) => false,
            Err(e) => {
                signal = Some(e);
                true
            }
        };
        call(&mut stop)
    });
    result.map_err(|e| client_error(py, e, signal))
}

/// The tuple a `parasync.VariableSpec` hands over (see `VariableSpec._native` in
/// `parasync/_spec.py`).
type SpecTuple<'py> = (String, Vec<usize>, String, (String, f32, f32, bool, f32, f32, f32, f32, f32), Bound<'py, PyAny>, bool);

fn optimizer(o: &(String, f32, f32, bool, f32, f32, f32, f32, f32)) -> PyResult<Optimizer> {
    let &(ref kind, lr, momentum, nesterov, beta1, beta2, epsilon, weight_decay, initial_accumulator) = o;
    Ok(match kind.as_str() {
        "sgd" => Optimizer::Sgd { lr, momentum, nesterov },
        "adagrad" => Optimizer::Adagrad { lr, initial_accumulator, epsilon },
        "adam" => Optimizer::Adam { lr, beta1, beta2, epsilon, weight_decay },
        "adamw" => Optimizer::AdamW { lr, beta1, beta2, epsilon, weight_decay },
        o => return Err(PyValueError::new_err(format!("unknown optimizer {o:?} (sgd, adagrad, adam, adamw)"))),
    })
}

/// `init` is None (zeros), a float32 array of the variable's size, or
/// `(kind, a, b, seed)` with kind `constant` (a), `uniform` (low a, high b), `normal`
/// (mean a, stddev b), `adopt` (another worker's values).
fn init(obj: &Bound<'_, PyAny>, name: &str, len: usize) -> PyResult<Init> {
    if obj.is_none() {
        return Ok(Init::Zeros);
    }
    if let Ok((kind, a, b, seed)) = obj.extract::<(String, f32, f32, u64)>() {
        return match kind.as_str() {
            "zeros" => Ok(Init::Zeros),
            "constant" => Ok(Init::Constant(a)),
            "uniform" => Ok(Init::Uniform { low: a, high: b, seed }),
            "normal" => Ok(Init::Normal { mean: a, stddev: b, seed }),
            "adopt" => Ok(Init::Adopt),
            o => Err(PyValueError::new_err(format!("variable {name:?}: unknown initializer {o:?}"))),
        };
    }
    let values: PyReadonlyArrayDyn<'_, f32> = obj.extract().map_err(|_| {
        PyTypeError::new_err(format!("variable {name:?}: initial values must be a float32 numpy.ndarray or an initializer"))
    })?;
    let values = values.as_slice().map_err(|_| PyValueError::new_err(format!("variable {name:?}: initial values are not contiguous")))?;
    if values.len() != len {
        return Err(PyValueError::new_err(format!(
            "variable {name:?}: {} initial values for {len} elements",
            values.len()
        )));
    }
    Ok(Init::Values(values.to_vec()))
}

fn spec(t: &SpecTuple<'_>) -> PyResult<VariableSpec> {
    let (name, shape, dtype, opt, init_obj, stochastic) = t;
    let mut s = VariableSpec::new(name.clone(), shape);
    s.dtype = wire_dtype(dtype, &format!("variable {name:?}: dtype"))?;
    s.optimizer = optimizer(opt)?;
    s.init = init(init_obj, name, s.len())?;
    s.stochastic_rounding = *stochastic;
    Ok(s)
}

/// A connection to every shard of a parameter-server job (see `parasync.PsClient`).
#[pyclass(module = "parasync._native", frozen)]
pub struct PsClient {
    /// `None` once closed. Calls clone the `Arc` and run without the lock.
    inner: Mutex<Option<Arc<BlockingClient>>>,
    /// Name and shape of each registered variable (set by `register`), for the per-call
    /// array checks without copying the specs.
    shapes: Mutex<Arc<Vec<Shape>>>,
    /// Row width of each sparse table, by name: those this client registered, and those it
    /// found on the shards (see `PsClient::table_dim`).
    tables: Mutex<HashMap<String, usize>>,
}

/// A registered variable as the array checks see it.
struct Shape {
    name: String,
    shape: Vec<usize>,
}

impl PsClient {
    fn client(&self) -> PyResult<Arc<BlockingClient>> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| PyValueError::new_err("the client is closed"))
    }

    /// The client and the registered variables, for a pull or push.
    fn registered(&self) -> PyResult<(Arc<BlockingClient>, Arc<Vec<Shape>>)> {
        let c = self.client()?;
        let shapes = Arc::clone(&self.shapes.lock().unwrap_or_else(|p| p.into_inner()));
        if shapes.is_empty() {
            return Err(PyValueError::new_err("register the model before pulling or pushing"));
        }
        Ok((c, shapes))
    }

    /// The row width of `table`: known from `register_table`, else asked of the shards
    /// once (a table another worker registered); `PsNotFoundError` when no shard has it.
    fn table_dim(&self, py: Python<'_>, c: &BlockingClient, table: &str) -> PyResult<usize> {
        if let Some(&dim) = self.tables.lock().unwrap_or_else(|p| p.into_inner()).get(table) {
            return Ok(dim);
        }
        let infos = blocking(py, |stop| c.shard_info(stop))?;
        let dim = infos.iter().flat_map(|i| &i.tables).find(|t| t.name == table).map(|t| t.dim as usize).ok_or_else(|| {
            let message = format!("table {table:?} does not exist on the shards (register_table creates it)");
            client_error(py, parasync_client::Error { kind: ErrorKind::NotFound, message }, None)
        })?;
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).insert(table.to_string(), dim);
        Ok(dim)
    }
}

/// `arrays`, one per registered variable in registration order (a sequence), or keyed by
/// name (a mapping with exactly the registered names).
fn per_variable<'py>(arrays: &Bound<'py, PyAny>, specs: &[Shape], what: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if let Ok(d) = arrays.cast::<PyDict>() {
        if d.len() != specs.len() {
            let given: Vec<String> = d.keys().iter().map(|k| k.to_string()).collect();
            return Err(PyValueError::new_err(format!(
                "{what}: {} arrays given for {} registered variables (given: {given:?})",
                d.len(),
                specs.len()
            )));
        }
        return specs
            .iter()
            .map(|s| {
                d.get_item(&s.name)?.ok_or_else(|| PyValueError::new_err(format!("{what}: no array for variable {:?}", s.name)))
            })
            .collect();
    }
    let seq = arrays
        .cast::<PySequence>()
        .map_err(|_| PyTypeError::new_err(format!("{what}: expected a dict of arrays by variable name, or a list in registration order")))?;
    let items: Vec<Bound<'py, PyAny>> = seq.try_iter()?.collect::<PyResult<_>>()?;
    if items.len() != specs.len() {
        return Err(PyValueError::new_err(format!(
            "{what}: {} arrays given for {} registered variables",
            items.len(),
            specs.len()
        )));
    }
    Ok(items)
}

fn inputs<'py>(objs: &[Bound<'py, PyAny>], specs: &[Shape]) -> PyResult<Vec<PyReadonlyArrayDyn<'py, f32>>> {
    objs.iter().zip(specs).map(|(o, s)| arrays::input(o, &s.name, &s.shape)).collect()
}

fn outputs<'py>(objs: &[Bound<'py, PyAny>], specs: &[Shape]) -> PyResult<Vec<PyReadwriteArrayDyn<'py, f32>>> {
    objs.iter().zip(specs).map(|(o, s)| arrays::output(o, &s.name, &s.shape)).collect()
}

/// What the shards did with a push: parts applied or accepted for their sync step, parts
/// dropped as late gradients, and the staleness of each applied async part
/// (`parasync.PushSummary`; made here so that a push returns without a dict in between).
#[pyclass(module = "parasync", name = "PushSummary", frozen, get_all, eq)]
#[derive(PartialEq)]
pub struct PushSummary {
    accepted: usize,
    dropped_stale: usize,
    staleness: Vec<u64>,
    retried: usize,
    duplicate: usize,
    /// Per part: (variable, part index, shard, applied, attempts, duplicate).
    parts: Vec<(String, usize, usize, bool, u32, bool)>,
}

impl PushSummary {
    fn new_of(s: parasync_client::PushSummary, specs: &[Shape]) -> Self {
        let parts = s
            .parts
            .iter()
            .map(|p| (specs[p.variable].name.clone(), p.part, p.shard, p.applied, p.attempts, p.duplicate))
            .collect();
        PushSummary { accepted: s.accepted, dropped_stale: s.dropped_stale, staleness: s.staleness, retried: s.retried, duplicate: s.duplicate, parts }
    }
}

#[pymethods]
impl PushSummary {
    #[new]
    #[pyo3(signature = (accepted, dropped_stale=0, staleness=Vec::new(), retried=0, duplicate=0, parts=Vec::new()))]
    fn new(
        accepted: usize,
        dropped_stale: usize,
        staleness: Vec<u64>,
        retried: usize,
        duplicate: usize,
        parts: Vec<(String, usize, usize, bool, u32, bool)>,
    ) -> Self {
        PushSummary { accepted, dropped_stale, staleness, retried, duplicate, parts }
    }

    fn __repr__(&self) -> String {
        format!(
            "PushSummary(accepted={}, dropped_stale={}, staleness={:?}, retried={}, duplicate={}, parts=[{} parts])",
            self.accepted,
            self.dropped_stale,
            self.staleness,
            self.retried,
            self.duplicate,
            self.parts.len()
        )
    }
}

#[pymethods]
impl PsClient {
    #[new]
    #[pyo3(signature = (addresses, worker_id=0, wire_dtype="f32", pull_wire_dtype=None, connect_timeout=30.0, pull_timeout=None, data_plane=true, reply_spin=0.0, split_bytes=None, chunk_bytes=None, recovery_timeout=60.0, auth_token=None, tls_ca=None, tls_cert=None, tls_key=None, tls_domain=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        addresses: Vec<String>,
        worker_id: u32,
        wire_dtype: &str,
        pull_wire_dtype: Option<&str>,
        connect_timeout: f64,
        pull_timeout: Option<f64>,
        data_plane: bool,
        reply_spin: f64,
        split_bytes: Option<usize>,
        chunk_bytes: Option<usize>,
        recovery_timeout: f64,
        auth_token: Option<&str>,
        tls_ca: Option<std::path::PathBuf>,
        tls_cert: Option<std::path::PathBuf>,
        tls_key: Option<std::path::PathBuf>,
        tls_domain: Option<String>,
    ) -> PyResult<Self> {
        let defaults = ClientOptions::default();
        let tls = match tls_ca {
            Some(ca) => Some(
                parasync_client::ClientTls::from_files(&ca, tls_cert.as_deref(), tls_key.as_deref(), tls_domain)
                    .map_err(|e| PyValueError::new_err(format!("tls_ca: {e}")))?,
            ),
            None if tls_cert.is_some() || tls_key.is_some() || tls_domain.is_some() => {
                return Err(PyValueError::new_err("tls_cert, tls_key and tls_domain need tls_ca (the shards' certificate authority)"))
            }
            None => None,
        };
        let opts = ClientOptions {
            worker_id,
            connect_timeout: seconds(connect_timeout, "connect_timeout")?,
            wire_dtype: self::wire_dtype(wire_dtype, "wire_dtype")?,
            pull_wire_dtype: pull_wire_dtype.map(|d| self::wire_dtype(d, "pull_wire_dtype")).transpose()?,
            pull_timeout: pull_timeout.map(|t| seconds(t, "pull_timeout")).transpose()?,
            data_plane,
            reply_spin: seconds(reply_spin, "reply_spin")?,
            split_bytes: split_bytes.unwrap_or(defaults.split_bytes),
            chunk_bytes: chunk_bytes.unwrap_or(defaults.chunk_bytes),
            recovery_timeout: seconds(recovery_timeout, "recovery_timeout")?,
            auth_token: crate::errors::auth_token(auth_token)?,
            tls,
            ..defaults
        };
        let client = blocking(py, |stop| BlockingClient::connect_interruptible(&addresses, opts, stop))?;
        Ok(PsClient {
            inner: Mutex::new(Some(Arc::new(client))),
            shapes: Mutex::new(Arc::new(Vec::new())),
            tables: Mutex::new(HashMap::new()),
        })
    }

    /// Registers the variables: a list of `parasync.VariableSpec._native()` tuples.
    fn register(&self, py: Python<'_>, specs: Vec<SpecTuple<'_>>) -> PyResult<()> {
        let specs = specs.iter().map(spec).collect::<PyResult<Vec<_>>>()?;
        let c = self.client()?;
        let shapes = specs.iter().map(|s| Shape { name: s.name.clone(), shape: s.shape.clone() }).collect();
        blocking(py, |stop| c.register(specs, stop))?;
        *self.shapes.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(shapes);
        Ok(())
    }

    /// `(name, shape)` of each registered variable, in registration order.
    fn variables(&self) -> PyResult<Vec<(String, Vec<usize>)>> {
        self.client()?;
        let shapes = Arc::clone(&self.shapes.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(shapes.iter().map(|s| (s.name.clone(), s.shape.clone())).collect())
    }

    /// Pulls the values of `step` into `out` (float32, C-contiguous, writable, one per variable).
    fn pull_into(&self, py: Python<'_>, step: u64, out: &Bound<'_, PyAny>) -> PyResult<()> {
        let (c, specs) = self.registered()?;
        let objs = per_variable(out, &specs, "pull_into")?;
        let mut borrowed = outputs(&objs, &specs)?;
        let mut slices: Vec<&mut [f32]> = borrowed.iter_mut().map(|a| a.as_slice_mut().expect("checked contiguous")).collect();
        blocking(py, |stop| c.pull_into(step, &mut slices, stop))
    }

    /// Pushes one gradient per variable for `step`; returns what the shards did with it.
    fn push<'py>(&self, py: Python<'py>, step: u64, grads: &Bound<'py, PyAny>) -> PyResult<PushSummary> {
        let (c, specs) = self.registered()?;
        let objs = per_variable(grads, &specs, "push")?;
        let borrowed = inputs(&objs, &specs)?;
        let slices: Vec<&[f32]> = borrowed.iter().map(|a| a.as_slice().expect("checked contiguous")).collect();
        blocking(py, |stop| c.push(step, &slices, stop)).map(|s| PushSummary::new_of(s, &specs))
    }

    /// Pushes the gradients of `step` and receives the values of `step + 1` into `out`.
    fn push_pull<'py>(&self, py: Python<'py>, step: u64, grads: &Bound<'py, PyAny>, out: &Bound<'py, PyAny>) -> PyResult<PushSummary> {
        let (c, specs) = self.registered()?;
        let gobjs = per_variable(grads, &specs, "push_pull")?;
        let oobjs = per_variable(out, &specs, "push_pull")?;
        let gb = inputs(&gobjs, &specs)?;
        let mut ob = outputs(&oobjs, &specs)?;
        let gs: Vec<&[f32]> = gb.iter().map(|a| a.as_slice().expect("checked contiguous")).collect();
        let mut os: Vec<&mut [f32]> = ob.iter_mut().map(|a| a.as_slice_mut().expect("checked contiguous")).collect();
        blocking(py, |stop| c.push_pull(step, &gs, &mut os, stop)).map(|s| PushSummary::new_of(s, &specs))
    }

    /// Creates a sparse table on every shard: a `parasync.TableSpec._native()` tuple.
    fn register_table(&self, py: Python<'_>, spec: TableSpecTuple) -> PyResult<()> {
        let spec = tables::spec(&spec)?;
        let c = self.client()?;
        blocking(py, |stop| c.register_table(&spec, stop))?;
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).insert(spec.name, spec.dim);
        Ok(())
    }

    /// The rows of `ids` (uint64, or non-negative int64, 1-D) for `step`, into `out`
    /// (float32, C-contiguous, writable, `(len(ids), dim)`) or a new array; returns it.
    #[pyo3(signature = (table, ids, step=0, out=None))]
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        table: &str,
        ids: &Bound<'py, PyAny>,
        step: u64,
        out: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.client()?;
        let ids = arrays::ids(ids, table)?;
        let ids = ids.as_slice();
        let dim = self.table_dim(py, &c, table)?;
        let out = match out {
            Some(o) => o,
            None => PyArray2::<f32>::zeros(py, [ids.len(), dim], false).into_any(),
        };
        let mut rows = arrays::table_out(&out, table, ids.len(), dim)?;
        let rows_slice = rows.as_slice_mut().expect("checked contiguous");
        blocking(py, |stop| c.lookup(table, ids, step, rows_slice, stop))?;
        drop(rows);
        Ok(out)
    }

    /// Pushes one gradient row per id (`grads`: float32, C-contiguous, `(len(ids), dim)` or
    /// flat) for `step`; rows of repeated ids are summed.
    #[pyo3(signature = (table, ids, grads, step=0))]
    fn push_sparse<'py>(
        &self,
        py: Python<'py>,
        table: &str,
        ids: &Bound<'py, PyAny>,
        grads: &Bound<'py, PyAny>,
        step: u64,
    ) -> PyResult<SparsePushSummary> {
        let c = self.client()?;
        let ids = arrays::ids(ids, table)?;
        let ids = ids.as_slice();
        let dim = self.table_dim(py, &c, table)?;
        let grads = arrays::table_grads(grads, table, ids.len(), dim)?;
        let grads = grads.as_slice().expect("checked contiguous");
        blocking(py, |stop| c.push_sparse(table, ids, grads, step, stop)).map(SparsePushSummary::from)
    }

    /// Sets the learning rate of every variable on every shard.
    fn set_learning_rate(&self, py: Python<'_>, lr: f32) -> PyResult<()> {
        let c = self.client()?;
        blocking(py, |stop| c.set_learning_rate(lr, stop))
    }

    /// Every shard's address, mode, workers, dropped gradients, variables and tables, as dicts.
    fn shard_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let c = self.client()?;
        let infos = blocking(py, |stop| c.shard_info(stop))?;
        let list = PyList::empty(py);
        for i in infos {
            let d = PyDict::new(py);
            d.set_item("address", i.addr)?;
            d.set_item("mode", i.mode)?;
            d.set_item("shard_index", i.shard_index)?;
            d.set_item("num_workers", i.num_workers)?;
            d.set_item("dropped_stale", i.dropped_stale)?;
            d.set_item("variables", i.variables)?;
            d.set_item("data_plane", i.data_plane)?;
            d.set_item("restored_step", i.restored_step)?;
            d.set_item("checkpoints", i.checkpoints)?;
            d.set_item("tables", tables::info_list(py, i.tables)?)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Every shard writes a checkpoint of `step` (sync: the step whose values were last
    /// pulled, every variable as that step left it); returns each shard's file as a dict
    /// (shard, step, path, bytes, seconds) once all are on disk.
    fn checkpoint<'py>(&self, py: Python<'py>, step: u64) -> PyResult<Bound<'py, PyList>> {
        let c = self.client()?;
        let files = blocking(py, |stop| c.checkpoint(step, stop))?;
        let list = PyList::empty(py);
        for f in files {
            let d = PyDict::new(py);
            d.set_item("shard", f.shard)?;
            d.set_item("step", f.step)?;
            d.set_item("path", f.path)?;
            d.set_item("bytes", f.bytes)?;
            d.set_item("seconds", f.seconds)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Number of shards.
    #[getter]
    fn num_shards(&self) -> PyResult<usize> {
        Ok(self.client()?.num_shards())
    }

    /// This client's worker id.
    #[getter]
    fn worker_id(&self) -> PyResult<u32> {
        Ok(self.client()?.options().worker_id)
    }

    /// Closes the connections (calls in flight on other threads finish first).
    fn close(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// True once closed.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}

/// Parameter-server addresses from `TF_CONFIG` (`cluster.ps`), or None.
#[pyfunction]
pub fn ps_addresses_from_env(py: Python<'_>) -> PyResult<Option<Vec<String>>> {
    parasync_client::ps_addresses_from_env().map_err(|e| client_error(py, e, None))
}
