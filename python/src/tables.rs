//! Sparse tables on the Python side: a `parasync.TableSpec` to the client's `TableSpec`, a
//! sparse push's outcome, and the tables a shard reports. The `PsClient` methods that use
//! them are in `ps.rs`.

use parasync_client::{Admission, DType, Eviction, RowInit, SparsePushSummary as Summary, TableInfo, TableOptimizer, TableSpec};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// `(kind, lr, beta1, beta2, epsilon, initial_accumulator, l1, l2, beta)`; kind `sgd`,
/// `adagrad`, `adam` or `ftrl`, each reading its own fields.
pub type OptimizerTuple = (String, f32, f32, f32, f32, f32, f32, f32, f32);

/// The tuple a `parasync.TableSpec` hands over (see `TableSpec._native` in
/// `parasync/_spec.py`): name, dim, dtype, init (None or `(kind, a, b, seed)` with kind
/// `uniform` / `normal`), optimizer, admission `(kind, min_count, probability, seed)` with
/// kind `always` / `min_count` / `probability`, eviction `(kind, ttl_steps)` with kind
/// `none` / `lru` / `lfu` / `ttl`, capacity.
pub type TableSpecTuple = (String, usize, String, Option<(String, f32, f32, u64)>, OptimizerTuple, (String, u32, f32, u64), (String, u64), u64);

fn refused(name: &str, what: &str, got: &str, allowed: &str) -> PyErr {
    PyValueError::new_err(format!("table {name:?}: unknown {what} {got:?} ({allowed})"))
}

/// The client's spec of a table; every choice is checked here, the values by the shards.
pub fn spec(t: &TableSpecTuple) -> PyResult<TableSpec> {
    let (name, dim, dtype, init, opt, admission, eviction, capacity) = t;
    let mut s = TableSpec::new(name.clone(), *dim);
    s.dtype = match dtype.as_str() {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::Bf16,
        o => return Err(PyValueError::new_err(format!("table {name:?}: dtype must be \"f32\" or \"bf16\", got {o:?}"))),
    };
    s.init = match init {
        None => RowInit::Zeros,
        Some((kind, a, b, seed)) => match kind.as_str() {
            "zeros" => RowInit::Zeros,
            "uniform" => RowInit::Uniform { low: *a, high: *b, seed: *seed },
            "normal" => RowInit::Normal { mean: *a, stddev: *b, seed: *seed },
            o => return Err(refused(name, "row initializer", o, "zeros, uniform, normal")),
        },
    };
    let &(ref kind, lr, beta1, beta2, epsilon, initial_accumulator, l1, l2, beta) = opt;
    s.optimizer = match kind.as_str() {
        "sgd" => TableOptimizer::Sgd { lr },
        "adagrad" => TableOptimizer::Adagrad { lr, initial_accumulator, epsilon },
        "adam" => TableOptimizer::Adam { lr, beta1, beta2, epsilon },
        "ftrl" => TableOptimizer::Ftrl { lr, initial_accumulator, l1, l2, beta },
        o => return Err(refused(name, "optimizer", o, "sgd, adagrad, adam, ftrl")),
    };
    let (kind, min_count, p, seed) = admission;
    s.admission = match kind.as_str() {
        "always" => Admission::Always,
        "min_count" => Admission::MinCount(*min_count),
        "probability" => Admission::Probability { p: *p, seed: *seed },
        o => return Err(refused(name, "admission", o, "always, min_count, probability")),
    };
    let (kind, steps) = eviction;
    s.eviction = match kind.as_str() {
        "none" => Eviction::None,
        "lru" => Eviction::Lru,
        "lfu" => Eviction::Lfu,
        "ttl" => Eviction::Ttl { steps: *steps },
        o => return Err(refused(name, "eviction", o, "none, lru, lfu, ttl")),
    };
    s.capacity = *capacity;
    Ok(s)
}

/// What the shards did with a sparse push (`parasync.SparsePushSummary`).
#[pyclass(module = "parasync", name = "SparsePushSummary", frozen, get_all, eq)]
#[derive(PartialEq)]
pub struct SparsePushSummary {
    /// Shards that applied their rows now, or accepted them for their sync step.
    accepted: usize,
    /// Shards that dropped them as late gradients for a completed sync step.
    dropped_stale: usize,
    /// Staleness of every applied async / bounded part.
    staleness: Vec<u64>,
    /// Distinct ids sent (rows of repeated ids are summed first).
    unique_ids: usize,
}

impl From<Summary> for SparsePushSummary {
    fn from(s: Summary) -> Self {
        SparsePushSummary { accepted: s.accepted, dropped_stale: s.dropped_stale, staleness: s.staleness, unique_ids: s.unique_ids }
    }
}

#[pymethods]
impl SparsePushSummary {
    #[new]
    #[pyo3(signature = (accepted, dropped_stale=0, staleness=Vec::new(), unique_ids=0))]
    fn new(accepted: usize, dropped_stale: usize, staleness: Vec<u64>, unique_ids: usize) -> Self {
        SparsePushSummary { accepted, dropped_stale, staleness, unique_ids }
    }

    fn __repr__(&self) -> String {
        format!(
            "SparsePushSummary(accepted={}, dropped_stale={}, staleness={:?}, unique_ids={})",
            self.accepted, self.dropped_stale, self.staleness, self.unique_ids
        )
    }
}

/// A shard's tables as a list of dicts (the fields of [`TableInfo`]).
pub fn info_list<'py>(py: Python<'py>, tables: Vec<TableInfo>) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for t in tables {
        let d = PyDict::new(py);
        d.set_item("name", t.name)?;
        d.set_item("dim", t.dim)?;
        d.set_item("version", t.version)?;
        d.set_item("rows", t.rows)?;
        d.set_item("admitted", t.admitted)?;
        d.set_item("evicted", t.evicted)?;
        d.set_item("dropped", t.dropped)?;
        d.set_item("rows_looked_up", t.rows_looked_up)?;
        d.set_item("rows_pushed", t.rows_pushed)?;
        list.append(d)?;
    }
    Ok(list)
}
