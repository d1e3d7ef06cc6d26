//! The variable table of one shard: definitions, values, optimizer state and consistency
//! clock of every variable, each behind its own lock.
//!
//! There is no global lock on the hot path: the table is a `DashMap` of `Arc<Variable>`,
//! looked up once per call; pushes and pulls of different variables never contend.
//!
//! Modules: [`def`] (definitions, validation, initialisers), [`variable`] (a variable's
//! state behind its lock, value snapshots), [`gradient`] (collecting and holding pushed
//! gradients), [`spare`] (spare gradient buffers), [`mean`] (sync-mode aggregation).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::consistency::{Mode, PushDecision, ReadGate, VariableClock};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::optimizer::{Grad, OptimizerState, Rounding};

mod capture;
mod def;
mod gradient;
mod mean;
mod spare;
mod variable;

pub use def::{Init, VariableDef, MAX_ELEMENTS};
pub use gradient::{Gradient, GradientBuffer};
pub use mean::mean_in_worker_order;
pub use spare::SpareBudget;
pub use capture::{RestoredVariable, VariableCapture};
pub use variable::{Values, ValuesSnapshot, Variable};
use variable::VariableState;

/// Outcome of a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registered {
    /// This call created the variable.
    pub created: bool,
    /// The variable's version.
    pub version: u64,
    /// Its values are still to be assigned ([`Init::AssignedLater`]).
    pub awaiting_values: bool,
}

/// Who pushed, for which step, computed from which version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushMeta {
    /// Worker id, `0..num_workers`.
    pub worker: u32,
    /// The worker's step (sync step, bounded clock).
    pub step: u64,
    /// Version the gradient was computed from (async staleness).
    pub base_version: u64,
}

/// One push of one client: a retry of it carries the same (see `PushHeader.sequence`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushId {
    /// Drawn at random by the client when it starts.
    pub incarnation: u64,
    /// The client's count of pushes.
    pub sequence: u64,
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushResult {
    /// Applied now, or buffered for its sync step.
    pub accepted: bool,
    /// Dropped as a late gradient for a completed sync step.
    pub dropped_stale: bool,
    /// Version after the push.
    pub version: u64,
    /// Staleness of an applied async / bounded gradient (0 in sync mode).
    pub staleness: u64,
    /// A retry of a push applied before: this is that push's result, nothing was applied now.
    pub duplicate: bool,
}

/// Settings of a store, fixed at start.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Consistency mode.
    pub mode: Mode,
    /// Accept NaN / Inf in gradients (rejected by default).
    pub allow_non_finite: bool,
    /// Bytes of gradient buffers kept for reuse over all variables (see [`SpareBudget`]).
    pub spare_buffer_bytes: usize,
    /// Most bytes of values and optimizer slots this shard holds over all its variables;
    /// a registration past it is refused (`resource_exhausted`) before anything is allocated.
    pub max_shard_bytes: u64,
    /// Most elements one variable (or part) may have.
    pub max_variable_elements: u64,
}

impl StoreConfig {
    /// Settings for `mode` with the defaults otherwise: non-finite gradients rejected, a
    /// spare-buffer budget of [`DEFAULT_SPARE_BUFFER_BYTES`].
    pub fn new(mode: Mode) -> Self {
        StoreConfig {
            mode,
            allow_non_finite: false,
            spare_buffer_bytes: DEFAULT_SPARE_BUFFER_BYTES,
            max_shard_bytes: u64::MAX,
            max_variable_elements: def::MAX_ELEMENTS,
        }
    }
}

/// Default of [`StoreConfig::spare_buffer_bytes`]: enough for the parts of a few large
/// variables in flight, a small fraction of a large shard's memory.
pub const DEFAULT_SPARE_BUFFER_BYTES: usize = 256 << 20;

/// Where variables come from when a restored shard is asked for one it does not hold yet
/// (a checkpoint restored onto another shard count: the new placement's parts are cut from
/// the old files as the clients register them).
pub trait RestoreSource: Send + Sync {
    /// The state of `def` in the checkpoint, `None` if it has none, or an error if the
    /// checkpoint's variable differs from `def` or cannot be read.
    fn variable(&self, def: &VariableDef) -> Result<Option<RestoredVariable>>;
}

/// Bytes reserved for a variable being created, given back on drop unless kept.
struct Reservation<'a> {
    held: &'a AtomicU64,
    bytes: u64,
    kept: bool,
}

impl Reservation<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.held.fetch_sub(self.bytes, Relaxed);
        }
    }
}

/// All variables of one shard.
pub struct VariableStore {
    config: StoreConfig,
    vars: DashMap<String, Arc<Variable>>,
    metrics: Arc<Metrics>,
    spares: Arc<SpareBudget>,
    /// Takes checkpoints as variables reach their steps (see [`crate::checkpoint`]).
    checkpointer: std::sync::OnceLock<Arc<crate::checkpoint::Checkpointer>>,
    restore_source: std::sync::OnceLock<Arc<dyn RestoreSource>>,
    /// Bytes of values and slots of the variables held or being created (see
    /// [`StoreConfig::max_shard_bytes`]).
    budget: Arc<crate::sparse::MemoryBudget>,
    /// The shard's sparse tables.
    tables: crate::sparse::SparseTables,
}

impl VariableStore {
    /// An empty store. `config.mode` must be valid.
    pub fn new(config: StoreConfig, metrics: Arc<Metrics>) -> Self {
        let spares = Arc::new(SpareBudget::new(config.spare_buffer_bytes, Arc::clone(&metrics)));
        let tables = crate::sparse::SparseTables::new(config.mode, config.allow_non_finite);
        let budget = Arc::new(crate::sparse::MemoryBudget::new(config.max_shard_bytes));
        tables.set_budget(Arc::clone(&budget));
        VariableStore {
            tables,
            config,
            vars: DashMap::new(),
            metrics,
            spares,
            checkpointer: std::sync::OnceLock::new(),
            restore_source: std::sync::OnceLock::new(),
            budget,
        }
    }

    /// The shard's sparse tables.
    pub fn tables(&self) -> &crate::sparse::SparseTables {
        &self.tables
    }

    /// Has `checkpointer` see every step of the variables and of the sparse tables, those
    /// registered or restored later included (once; later calls change nothing).
    pub fn set_checkpointer(self: &Arc<Self>, checkpointer: Arc<crate::checkpoint::Checkpointer>) {
        if self.checkpointer.set(Arc::clone(&checkpointer)).is_ok() {
            checkpointer.attach(self);
        }
    }

    /// The checkpointer, if the shard writes checkpoints.
    pub fn checkpointer(&self) -> Option<&Arc<crate::checkpoint::Checkpointer>> {
        self.checkpointer.get()
    }

    /// Has registrations of variables this shard does not hold look in `source` first.
    pub fn set_restore_source(&self, source: Arc<dyn RestoreSource>) {
        let _ = self.restore_source.set(source);
    }

    /// Every variable's state as it is now, each as of one version (variables apart may be
    /// at different versions).
    pub fn capture_all(&self) -> Vec<VariableCapture> {
        self.list()
            .iter()
            .map(|v| {
                let st = v.state.read();
                VariableCapture::take(v, &st)
            })
            .collect()
    }

    /// `var`'s state if it is at `version` now; `Err(current)` if it is past it.
    pub fn capture_at(&self, var: &Variable, version: u64) -> std::result::Result<Option<VariableCapture>, u64> {
        let st = var.state.read();
        match st.clock.version() {
            v if v == version => Ok(Some(VariableCapture::take(var, &st))),
            v if v < version => Ok(None),
            v => Err(v),
        }
    }

    /// Creates a variable from a checkpoint's state. Fails if it exists already.
    pub fn insert_restored(&self, def: VariableDef, restored: RestoredVariable) -> Result<()> {
        let len = def.validate(self.config.max_variable_elements)?;
        let reservation = self.reserve(&def, len)?;
        restored.check(&def, len)?;
        let optimizer = OptimizerState::restored(def.optimizer.clone(), len, restored.optimizer)
            .map_err(|e| Error::invalid(&def.name, format!("checkpoint: {e}")))?;
        let mut clock = VariableClock::new(self.config.mode);
        clock.restore(restored.version, &restored.worker_clocks).map_err(|e| Error::invalid(&def.name, e))?;
        let state = VariableState {
            values: Arc::new(restored.values),
            optimizer,
            clock,
            step_started: None,
            awaiting_values: false,
            last_push: restored.last_pushes.iter().map(|(w, id, r)| (*w, (*id, *r))).collect(),
        };
        match self.vars.entry(def.name.clone()) {
            dashmap::Entry::Occupied(_) => Err(Error::Conflict { variable: def.name, reason: "restored twice".into() }),
            dashmap::Entry::Vacant(e) => {
                e.insert(Arc::new(Variable::new(def, len, state, Arc::clone(&self.spares))));
                self.metrics.variables.fetch_add(1, Relaxed);
                reservation.keep();
                Ok(())
            }
        }
    }

    /// The store's settings.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The spare gradient buffers' budget and use.
    pub fn spare_budget(&self) -> &SpareBudget {
        &self.spares
    }

    /// The metrics this store updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Creates a variable, or confirms an identical one. Returns (created, version).
    pub fn register(&self, def: VariableDef, init: &Init) -> Result<(bool, u64)> {
        self.register_full(def, init).map(|r| (r.created, r.version))
    }

    /// [`VariableStore::register`], also saying whether the variable still awaits its values.
    pub fn register_full(&self, def: VariableDef, init: &Init) -> Result<Registered> {
        let len = def.validate(self.config.max_variable_elements)?;
        if let Some(existing) = self.vars.get(&def.name) {
            return Self::confirm(&existing, &def);
        }
        if let Some(source) = self.restore_source.get() {
            if let Some(restored) = source.variable(&def)? {
                let name = def.name.clone();
                return match self.insert_restored(def.clone(), restored) {
                    Ok(()) => {
                        let version = self.get(&name)?.state.read().clock.version();
                        Ok(Registered { created: false, version, awaiting_values: false })
                    }
                    // A concurrent registration restored it first.
                    Err(Error::Conflict { .. }) => Self::confirm(&*self.get(&name)?, &def),
                    Err(e) => Err(e),
                };
            }
        }
        // Before anything is allocated: the shard's memory limit.
        let reservation = self.reserve(&def, len)?;
        // Materialise outside the map's shard lock: initialisation of a large variable is slow.
        let values = init.materialize(&def.name, len)?;
        let entry = self.vars.entry(def.name.clone());
        match entry {
            dashmap::Entry::Occupied(e) => Self::confirm(e.get(), &def),
            dashmap::Entry::Vacant(e) => {
                let state = VariableState {
                    values: Arc::new(Values::from_f32(def.dtype, values)),
                    optimizer: OptimizerState::new(def.optimizer.clone(), len),
                    clock: VariableClock::new(self.config.mode),
                    step_started: None,
                    awaiting_values: matches!(init, Init::AssignedLater),
                    last_push: Default::default(),
                };
                let awaiting_values = state.awaiting_values;
                e.insert(Arc::new(Variable::new(def, len, state, Arc::clone(&self.spares))));
                self.metrics.variables.fetch_add(1, Relaxed);
                reservation.keep();
                Ok(Registered { created: true, version: 0, awaiting_values })
            }
        }
    }

    /// Reserves the bytes of `def`'s values and slots against `max_shard_bytes`; the
    /// reservation is given back unless kept (the variable was created).
    fn reserve(&self, def: &VariableDef, len: usize) -> Result<Reservation<'_>> {
        let bytes = def.bytes_held(len);
        let max = self.config.max_shard_bytes;
        self.budget
            .held
            .fetch_update(Relaxed, Relaxed, |held| held.checked_add(bytes).filter(|&after| after <= max))
            .map_err(|held| Error::ResourceExhausted {
                variable: def.name.clone(),
                reason: format!(
                    "it needs {bytes} bytes (values and {} optimizer slot(s)); this shard holds {held} of its \
                     --max-shard-bytes {max}",
                    def.optimizer.num_slots()
                ),
            })?;
        Ok(Reservation { held: &self.budget.held, bytes, kept: false })
    }

    /// Creates a sparse table (or confirms an identical one). A table with a capacity holds
    /// up to `capacity` rows of values and slots: that much is reserved from
    /// `--max-shard-bytes` when it is created (`resource_exhausted` past it), or restored (see
    /// [`VariableStore::insert_restored_table`]). A table without a capacity takes each row's
    /// bytes from it as the row is created: once the shard is full it creates no more rows
    /// and drops the updates of ids without one (counted; said once in the log).
    pub fn register_table(&self, def: crate::sparse::TableDef) -> Result<bool> {
        if let Ok(existing) = self.tables.get(&def.name) {
            let diff = existing.def.differences(&def);
            if diff.is_empty() {
                return Ok(false);
            }
        }
        def.validate().map_err(|reason| Error::invalid(&def.name, reason))?;
        let reservation = self.reserve_table(&def, 0)?;
        let created = self.tables.register(def)?;
        if created {
            reservation.keep();
        }
        Ok(created)
    }

    /// Creates a sparse table from a checkpoint's state (see
    /// [`crate::sparse::SparseTables::insert_restored`]), reserving its capacity from
    /// `--max-shard-bytes` as a registration does (`resource_exhausted` naming the table if
    /// it does not fit).
    pub fn insert_restored_table(&self, restored: crate::sparse::RestoredTable) -> Result<()> {
        restored.def.validate().map_err(|reason| Error::invalid(&restored.def.name, format!("checkpoint: {reason}")))?;
        let rows = restored.rows.ids.len() as u64;
        let reservation = self.reserve_table(&restored.def, rows)?;
        self.tables.insert_restored(restored)?;
        reservation.keep();
        Ok(())
    }

    /// Reserves the bytes of `def`'s capacity (rows of values and slots) against
    /// `max_shard_bytes`, or for a table without one the bytes of the `rows` it holds
    /// already (a restored table; later rows take theirs as they are created); given back
    /// unless kept.
    fn reserve_table(&self, def: &crate::sparse::TableDef, rows: u64) -> Result<Reservation<'_>> {
        let rows = if def.capacity > 0 { def.capacity } else { rows };
        let bytes = rows.saturating_mul(def.row_bytes());
        let max = self.config.max_shard_bytes;
        self.budget
            .held
            .fetch_update(Relaxed, Relaxed, |held| held.checked_add(bytes).filter(|&after| after <= max))
            .map_err(|held| Error::ResourceExhausted {
                variable: def.name.clone(),
                reason: format!(
                    "the table needs {bytes} bytes for {rows} rows of {} bytes (values and slots{}); this shard holds \
                     {held} of its --max-shard-bytes {max}",
                    def.row_bytes(),
                    if def.capacity > 0 { ": the table's capacity" } else { ", restored" }
                ),
            })?;
        Ok(Reservation { held: &self.budget.held, bytes, kept: false })
    }

    /// Bytes of values and optimizer slots held by the variables of this shard.
    pub fn held_bytes(&self) -> u64 {
        self.budget.held.load(Relaxed)
    }

    fn confirm(existing: &Variable, def: &VariableDef) -> Result<Registered> {
        let diff = existing.def.differences(def);
        if diff.is_empty() {
            let st = existing.state.read();
            Ok(Registered { created: false, version: st.clock.version(), awaiting_values: st.awaiting_values })
        } else {
            Err(Error::Conflict { variable: def.name.clone(), reason: diff.join("; ") })
        }
    }

    /// Looks a variable up.
    pub fn get(&self, name: &str) -> Result<Arc<Variable>> {
        self.vars.get(name).map(|v| Arc::clone(&v)).ok_or_else(|| Error::NotFound { variable: name.to_string() })
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True when no variable is registered.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// All variables, sorted by name.
    pub fn list(&self) -> Vec<Arc<Variable>> {
        let mut v: Vec<_> = self.vars.iter().map(|e| Arc::clone(e.value())).collect();
        v.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        v
    }

    /// Hands a complete, validated gradient to the consistency mode and carries out its
    /// decision: apply, buffer, apply the step's mean, or drop.
    pub fn push_gradient(&self, var: &Variable, meta: PushMeta, grad: impl Into<Gradient>) -> Result<PushResult> {
        self.push_gradient_once(var, meta, None, grad)
    }

    /// [`push_gradient`](Self::push_gradient) of push `id`: applied at most once. A push
    /// with the `id` of the last one this worker's client applied to this variable (its
    /// retry, after a reply that never arrived) gets that push's result back, marked
    /// duplicate, and changes nothing.
    pub fn push_gradient_once(&self, var: &Variable, meta: PushMeta, id: Option<PushId>, grad: impl Into<Gradient>) -> Result<PushResult> {
        let grad = grad.into();
        debug_assert_eq!(grad.len(), var.len);
        let checkpointer = self.checkpointer.get();
        if let Some(c) = checkpointer {
            c.before_push(self, meta.step);
        }
        let mut st = var.write();
        if st.awaiting_values {
            return Err(Error::AwaitingValues { variable: var.def.name.clone() });
        }
        if let (Some(id), Some((last, result))) = (id, st.last_push.get(&meta.worker)) {
            if *last == id {
                let result = PushResult { duplicate: true, ..*result };
                drop(st);
                recycle(var, grad);
                self.metrics.duplicate_pushes.fetch_add(1, Relaxed);
                return Ok(result);
            }
        }
        let decision = st
            .clock
            .on_push(meta.worker, meta.step, meta.base_version, grad)
            .map_err(|refusal| Error::Refused { variable: var.def.name.clone(), refusal })?;
        let mut result = PushResult { accepted: true, dropped_stale: false, version: 0, staleness: 0, duplicate: false };
        let step_done = matches!(decision, PushDecision::ApplyMean { .. });
        match decision {
            PushDecision::Apply { grad, staleness, lr_scale } => {
                let started = Instant::now();
                apply(&mut st, var, grad.as_grad(), lr_scale);
                recycle(var, grad);
                self.metrics.staleness.observe(staleness as f64);
                self.metrics.step_latency.observe(started.elapsed().as_secs_f64());
                result.staleness = staleness;
            }
            PushDecision::Buffered { .. } => {
                st.step_started.get_or_insert_with(Instant::now);
            }
            PushDecision::ApplyMean { grads, .. } => {
                let first_is_f32 = matches!(grads.first(), Some((_, Gradient::F32(_))));
                let (mean, used) = mean_in_worker_order(grads);
                apply(&mut st, var, Grad::F32(&mean), 1.0);
                // The mean is the first gradient's f32 buffer when it came as f32; a
                // widened bf16 one is not kept, since pushes reuse buffers of their wire.
                if first_is_f32 {
                    recycle(var, Gradient::F32(mean));
                }
                for g in used {
                    recycle(var, g);
                }
                let started = st.step_started.take().unwrap_or_else(Instant::now);
                self.metrics.step_latency.observe(started.elapsed().as_secs_f64());
            }
            PushDecision::DropStale { .. } => {
                result.accepted = false;
                result.dropped_stale = true;
                self.metrics.dropped_stale.fetch_add(1, Relaxed);
            }
        }
        result.version = st.clock.version();
        if let Some(id) = id {
            st.last_push.insert(meta.worker, (id, result));
        }
        // A sync step completed here: the checkpoint of this step takes the state now, in
        // before the variable can complete the next step.
        let captured = checkpointer.filter(|c| step_done && c.wants_step(result.version));
        if let Some(c) = captured {
            c.captured(VariableCapture::take(var, &st));
        }
        drop(st);
        if result.accepted {
            self.metrics.pushes.fetch_add(1, Relaxed);
            var.changed.send_modify(|c| *c += 1);
        }
        if let Some(c) = captured {
            c.after_captured(self, result.version);
        }
        Ok(result)
    }

    /// Sets the initial values of a variable registered with its values to follow (too large
    /// for the registration). Only the first assignment counts: a later one (a second worker
    /// that found the values still missing and sent the same ones, arriving after updates
    /// were applied) changes nothing, so it cannot wipe those updates. Returns the version
    /// and whether these values were taken.
    pub fn assign(&self, var: &Variable, values: Vec<f32>) -> Result<(u64, bool)> {
        if values.len() != var.len {
            return Err(Error::invalid(&var.def.name, format!("assigned {} elements, the variable has {}", values.len(), var.len)));
        }
        let mut st = var.write();
        if !st.awaiting_values {
            return Ok((st.clock.version(), false));
        }
        st.values = Arc::new(Values::from_f32(var.def.dtype, values));
        st.awaiting_values = false;
        let v = st.clock.version();
        drop(st);
        var.changed.send_modify(|c| *c += 1);
        Ok((v, true))
    }

    /// Waits until `worker` may read `var` for `step` (sync: the step exists; bounded: the
    /// slowest worker is close enough), or fails after `timeout` naming the missing workers.
    pub async fn wait_readable(&self, var: &Variable, step: u64, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = var.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let (gate, version, awaiting) =
                var.read_async(|st| (st.clock.read_gate(step), st.clock.version(), st.awaiting_values)).await;
            let missing = match gate {
                ReadGate::Ready if !awaiting => return Ok(()),
                ReadGate::Ready => Vec::new(),
                ReadGate::Wait { missing } => missing,
            };
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Error::ShuttingDown),
                Err(_) if awaiting => {
                    return Err(Error::ValuesTimeout { variable: var.def.name.clone(), waited: timeout })
                }
                Err(_) => {
                    return Err(Error::StepTimeout {
                        variable: var.def.name.clone(),
                        step,
                        version,
                        waited: timeout,
                        missing,
                    })
                }
            }
        }
    }

    /// Sets the learning rate of one variable (`Some(name)`) or of all; returns how many changed.
    pub fn set_learning_rate(&self, name: Option<&str>, lr: f32) -> Result<u32> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::invalid(name.unwrap_or("*"), format!("learning rate must be finite and >= 0, got {lr}")));
        }
        // A name is a variable's, or else a table's; all means both.
        let (targets, tables) = match name {
            Some(n) => match (self.get(n), self.tables.get(n)) {
                (Ok(v), _) => (vec![v], Vec::new()),
                (Err(_), Ok(t)) => (Vec::new(), vec![t]),
                (Err(e), Err(_)) => return Err(e),
            },
            None => (self.list(), self.tables.list()),
        };
        for v in &targets {
            v.write().optimizer.set_learning_rate(lr);
        }
        for t in &tables {
            t.set_learning_rate(lr);
        }
        Ok((targets.len() + tables.len()) as u32)
    }
}


fn apply(st: &mut VariableState, var: &Variable, grad: Grad<'_>, lr_scale: f32) {
    let VariableState { values, optimizer, .. } = st;
    if Arc::get_mut(values).is_none() {
        // A pull still reads these values: update a copy (into a buffer a pull handed back, if any).
        let copy = match var.spare_values.lock().take() {
            Some(mut spare) => {
                if spare.copy_from(values) {
                    spare
                } else {
                    Values::clone(values)
                }
            }
            None => Values::clone(values),
        };
        *values = Arc::new(copy);
    }
    match Arc::get_mut(values).expect("not shared: copied above") {
        Values::F32(p) => optimizer.apply_f32_grad(p, grad, lr_scale),
        Values::Bf16(p) => {
            let rounding = if var.def.stochastic_rounding { Rounding::Stochastic } else { Rounding::NearestEven };
            optimizer.apply_bf16_grad(p, grad, lr_scale, rounding, var.rounding_seed);
        }
    }
}

fn recycle(var: &Variable, buf: Gradient) {
    var.spare.lock().keep(buf);
}



#[cfg(test)]
mod tests {
    use super::*;
    use parasync_tensor::{bf16, DType};

    use super::mean::MEAN_BLOCK;
    use crate::optimizer::OptimizerSpec;

    fn sgd(lr: f32) -> OptimizerSpec {
        OptimizerSpec::Sgd { lr, momentum: 0.0, nesterov: false }
    }

    fn def(name: &str, shape: &[u64], dtype: DType) -> VariableDef {
        VariableDef { name: name.into(), shape: shape.to_vec(), dtype, optimizer: sgd(1.0), stochastic_rounding: false }
    }

    fn store(mode: Mode) -> VariableStore {
        VariableStore::new(StoreConfig::new(mode), Arc::new(Metrics::default()))
    }

    #[test]
    fn registration_is_idempotent_and_conflicts_are_errors() {
        let s = store(Mode::Async { num_workers: 1, lr_div_staleness: false });
        assert_eq!(s.register(def("w", &[2, 3], DType::F32), &Init::Constant(1.0)).unwrap(), (true, 0));
        assert_eq!(s.register(def("w", &[2, 3], DType::F32), &Init::Zeros).unwrap(), (false, 0));
        let err = s.register(def("w", &[3, 2], DType::F32), &Init::Zeros).unwrap_err();
        assert!(err.to_string().contains("shape [3, 2] vs [2, 3]") || err.to_string().contains("shape [2, 3] vs [3, 2]"), "{err}");
        assert_eq!(s.get("w").unwrap().snapshot().1, vec![1.0; 6], "re-registration must not re-initialise");
    }

    #[test]
    fn a_capture_keeps_its_version_while_updates_go_on_and_restores_exactly() {
        let s = store(Mode::Async { num_workers: 1, lr_div_staleness: false });
        let mut d = def("w", &[4], DType::F32);
        d.optimizer = OptimizerSpec::Adam { lr: 0.1, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0, decoupled: false };
        s.register(d.clone(), &Init::Constant(1.0)).unwrap();
        let v = s.get("w").unwrap();
        let push = |g: f32| {
            let base_version = v.state.read().clock.version();
            s.push_gradient(&v, PushMeta { worker: 0, step: 0, base_version }, vec![g; 4]).unwrap()
        };
        let id = PushId { incarnation: 7, sequence: 1 };
        let first = s.push_gradient_once(&v, PushMeta { worker: 0, step: 0, base_version: 0 }, Some(id), vec![0.5; 4]).unwrap();
        let again = s.push_gradient_once(&v, PushMeta { worker: 0, step: 0, base_version: 0 }, Some(id), vec![0.5; 4]).unwrap();
        assert_eq!(again, PushResult { duplicate: true, ..first }, "a retry is answered, not applied");
        let cap = s.capture_all().remove(0);
        let (values, slots) = (cap.values_f32(), cap.optimizer.slots.iter().map(|x| x.to_vec()).collect::<Vec<_>>());
        assert_eq!((cap.version, cap.optimizer.updates), (1, 1));
        push(-2.0);
        push(0.25);
        assert_eq!(cap.values_f32(), values, "updates after the capture copied the values");
        assert_eq!(cap.optimizer.slots.iter().map(|x| x.to_vec()).collect::<Vec<_>>(), slots, "and the slots");
        assert_ne!(v.snapshot().1, values);

        // Restored into another store, the capture continues as the original did.
        let r = store(Mode::Async { num_workers: 1, lr_div_staleness: false });
        let restored = RestoredVariable {
            version: cap.version,
            values: Values::F32(values),
            optimizer: cap.optimizer.clone(),
            worker_clocks: vec![],
            last_pushes: cap.last_pushes.clone(),
        };
        r.insert_restored(d.clone(), restored).unwrap();
        let rv = r.get("w").unwrap();
        let retried = r.push_gradient_once(&rv, PushMeta { worker: 0, step: 0, base_version: 0 }, Some(id), vec![0.5; 4]).unwrap();
        assert!(retried.duplicate && rv.snapshot().0 == 1, "the restored shard still knows the push it had applied");
        for g in [-2.0, 0.25] {
            let base_version = rv.state.read().clock.version();
            r.push_gradient(&rv, PushMeta { worker: 0, step: 0, base_version }, vec![g; 4]).unwrap();
        }
        assert_eq!(rv.snapshot(), v.snapshot(), "same version, same bits");
        assert_eq!(r.register(d, &Init::Zeros).unwrap(), (false, 3), "registration confirms the restored variable");
    }

    #[test]
    fn bad_definitions_are_rejected() {
        let s = store(Mode::Async { num_workers: 1, lr_div_staleness: false });
        for d in [def("a", &[], DType::F32), def("b", &[0, 2], DType::F32), def("", &[1], DType::F32)] {
            assert!(matches!(s.register(d, &Init::Zeros), Err(Error::InvalidArgument { .. })));
        }
        let huge = s.register(def("c", &[1 << 20, 1 << 20], DType::F32), &Init::Zeros);
        assert!(matches!(huge, Err(Error::ResourceExhausted { .. })), "{huge:?}");
        assert!(s.register(def("v", &[3], DType::F32), &Init::Values(vec![1.0])).is_err());
        assert!(s.list().is_empty());
        assert_eq!(s.held_bytes(), 0, "refused registrations hold nothing");
    }

    #[test]
    fn registrations_past_the_shard_limit_are_refused_and_failures_give_their_bytes_back() {
        let mut config = StoreConfig::new(Mode::Async { num_workers: 1, lr_div_staleness: false });
        config.max_shard_bytes = 900;
        let s = VariableStore::new(config, Arc::new(Metrics::default()));
        // 100 f32 = 400 bytes (SGD without momentum keeps no slot)
        s.register(def("a", &[100], DType::F32), &Init::Zeros).unwrap();
        s.register(def("a", &[100], DType::F32), &Init::Zeros).unwrap(); // the same again: no new bytes
        assert_eq!(s.held_bytes(), 400);
        // a failing initializer gives its reservation back
        let bad = Init::Uniform { low: 1.0, high: 0.0, seed: 0 };
        assert!(s.register(def("b", &[100], DType::F32), &bad).is_err());
        assert_eq!(s.held_bytes(), 400);
        s.register(def("b", &[100], DType::Bf16), &Init::Zeros).unwrap(); // 200 bytes
        let err = s.register(def("c", &[100], DType::F32), &Init::Zeros).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::ResourceExhausted { .. }), "{err:?}");
        assert!(msg.contains("needs 400 bytes") && msg.contains("holds 600 of its --max-shard-bytes 900"), "{msg}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::ResourceExhausted);
        s.register(def("c", &[100], DType::Bf16), &Init::Zeros).unwrap();
        assert_eq!((s.len(), s.held_bytes()), (3, 800));
    }

    #[test]
    fn sync_push_applies_mean_once_step_completes() {
        let s = store(Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 });
        s.register(def("w", &[2], DType::F32), &Init::Constant(10.0)).unwrap();
        let v = s.get("w").unwrap();
        let r = s.push_gradient(&v, PushMeta { worker: 1, step: 0, base_version: 0 }, vec![3.0, 5.0]).unwrap();
        assert_eq!((r.accepted, r.version), (true, 0));
        assert_eq!(v.snapshot(), (0, vec![10.0, 10.0]));
        let r = s.push_gradient(&v, PushMeta { worker: 0, step: 0, base_version: 0 }, vec![1.0, 1.0]).unwrap();
        assert_eq!(r.version, 1);
        assert_eq!(v.snapshot(), (1, vec![8.0, 7.0]));
        let r = s.push_gradient(&v, PushMeta { worker: 0, step: 0, base_version: 0 }, vec![1.0, 1.0]).unwrap();
        assert!(r.dropped_stale && !r.accepted);
        assert_eq!(s.metrics().dropped_stale.load(Relaxed), 1);
        assert_eq!(v.snapshot(), (1, vec![8.0, 7.0]));
    }

    #[test]
    fn sync_mean_of_large_finite_gradients_stays_finite() {
        // Three gradients near f32::MAX: an f32 running sum overflows to infinity before
        // the division; the mean does not.
        let big = 3.0e38f32;
        let s = store(Mode::Sync { num_workers: 3, replicas_to_aggregate: 3 });
        let mut d = def("w", &[2], DType::F32);
        d.optimizer = sgd(0.5);
        s.register(d, &Init::Constant(1.0e38)).unwrap();
        let v = s.get("w").unwrap();
        for worker in [2, 0, 1] {
            s.push_gradient(&v, PushMeta { worker, step: 0, base_version: 0 }, vec![big, -big]).unwrap();
        }
        let (version, values) = v.snapshot();
        assert_eq!(version, 1);
        assert_eq!(values, vec![1.0e38 - 0.5 * big, 1.0e38 + 0.5 * big], "w - 0.5 * mean, with the mean finite");
        assert!(values.iter().all(|x| x.is_finite()), "{values:?}");
    }

    #[test]
    fn mean_is_summed_in_worker_order_and_overflows_are_summed_again_in_f64() {
        // Longer than one block, with bf16 and f32 gradients mixed: each element's mean is
        // ((g0 + g1) + g2) / 3 in f32, except where that sum overflows.
        let len = MEAN_BLOCK * 2 + 17;
        let g = |w: u32| -> Vec<f32> { (0..len).map(|i| ((i as f32) * 0.37 + w as f32 * 1.1).sin() * 1e-3 * (w + 1) as f32).collect() };
        let bf = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| bf16::from_f32_rne(x)).collect() };
        let (mut g0, g1, mut g2) = (g(0), bf(&g(1)), g(2));
        let big = 3.0e38f32;
        let overflowing = MEAN_BLOCK + 5;
        (g0[overflowing], g2[overflowing]) = (big, big);
        let widened: Vec<f32> = g1.iter().map(|&w| bf16::to_f32(w)).collect();
        let mut want: Vec<f32> = (0..len).map(|i| (g0[i] + widened[i] + g2[i]) / 3.0).collect();
        assert!(want[overflowing].is_infinite(), "the f32 sum overflows");
        want[overflowing] = ((big as f64 * 2.0 + widened[overflowing] as f64) / 3.0) as f32;
        let (got, used) = mean_in_worker_order(vec![(0, Gradient::F32(g0)), (1, Gradient::Bf16(g1)), (2, Gradient::F32(g2))]);
        assert_eq!(used.len(), 2, "the buffers of the gradients after the first come back");
        assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn spare_buffers_stay_within_the_shard_budget() {
        // Room for two spares of 16 f32 values: pushing four variables keeps two, and a
        // push that reuses a spare gives its bytes back.
        let mut config = StoreConfig::new(Mode::Async { num_workers: 1, lr_div_staleness: false });
        config.spare_buffer_bytes = 2 * 16 * 4;
        let s = VariableStore::new(config, Arc::new(Metrics::default()));
        let vars: Vec<Arc<Variable>> = (0..4)
            .map(|i| {
                s.register(def(&format!("v{i}"), &[16], DType::F32), &Init::Zeros).unwrap();
                s.get(&format!("v{i}")).unwrap()
            })
            .collect();
        for v in &vars {
            s.push_gradient(v, PushMeta { worker: 0, step: 0, base_version: 0 }, vec![1.0; 16]).unwrap();
        }
        assert_eq!(s.spare_budget().used(), 128, "two spares kept, two dropped");
        let kept: Vec<bool> = vars.iter().map(|v| v.spare.lock().f32.is_some()).collect();
        assert_eq!(kept, vec![true, true, false, false]);
        let b = GradientBuffer::new(&vars[0], DType::F32, 16, true).unwrap();
        assert_eq!(s.spare_budget().used(), 64, "the reused spare's bytes are free again");
        drop(b);
        assert!(s.metrics().render(0).contains("parasync_spare_buffer_bytes{shard=\"0\"} 64"));
        let mut none = StoreConfig::new(Mode::Async { num_workers: 1, lr_div_staleness: false });
        none.spare_buffer_bytes = 0;
        let s = VariableStore::new(none, Arc::new(Metrics::default()));
        s.register(def("w", &[16], DType::F32), &Init::Zeros).unwrap();
        s.push_gradient(&s.get("w").unwrap(), PushMeta { worker: 0, step: 0, base_version: 0 }, vec![1.0; 16]).unwrap();
        assert_eq!(s.spare_budget().used(), 0, "a zero budget keeps nothing");
    }

    #[test]
    fn sync_steps_with_bf16_gradients_keep_a_bf16_spare_not_the_f32_mean() {
        let s = store(Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 });
        s.register(def("w", &[8], DType::F32), &Init::Zeros).unwrap();
        let v = s.get("w").unwrap();
        for worker in [1, 0] {
            s.push_gradient(&v, PushMeta { worker, step: 0, base_version: 0 }, Gradient::Bf16(vec![0x3f80; 8])).unwrap();
        }
        assert_eq!(v.snapshot(), (1, vec![-1.0; 8]), "mean 1.0 applied with lr 1");
        let spare = v.spare.lock();
        assert!(spare.bf16.is_some() && spare.f32.is_none(), "{spare:?}");
        assert_eq!(s.spare_budget().used(), 16);
    }

    #[test]
    fn gradient_buffer_checks_length_and_finiteness() {
        let s = store(Mode::Async { num_workers: 1, lr_div_staleness: false });
        s.register(def("w", &[3], DType::F32), &Init::Zeros).unwrap();
        let v = s.get("w").unwrap();
        assert!(GradientBuffer::new(&v, DType::F32, 4, true).is_err());
        let mut b = GradientBuffer::new(&v, DType::F32, 3, true).unwrap();
        assert!(b.append(&[0u8; 5]).is_err(), "ragged chunk");
        let mut bytes = Vec::new();
        parasync_tensor::encode_f32(&[1.0, f32::NAN], DType::F32, &mut bytes);
        let err = b.append(&bytes).unwrap_err().to_string();
        assert!(err.contains("element 1 is NaN"), "{err}");
        let mut b = GradientBuffer::new(&v, DType::F32, 3, true).unwrap();
        b.append(&bytes[..4]).unwrap();
        assert!(b.finish().unwrap_err().to_string().contains("after 1 of 3"));
        let mut b = GradientBuffer::new(&v, DType::F32, 3, true).unwrap();
        assert!(b.append(&[0u8; 16]).unwrap_err().to_string().contains("overruns"));
    }

    #[test]
    fn bf16_wire_gradients_stay_words_and_average_like_their_values() {
        let s = store(Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 });
        s.register(def("w", &[3], DType::F32), &Init::Constant(1.0)).unwrap();
        let v = s.get("w").unwrap();
        let mut wire = Vec::new();
        parasync_tensor::encode_f32(&[0.5, f32::INFINITY, 1.0], DType::Bf16, &mut wire);
        let mut b = GradientBuffer::new(&v, DType::Bf16, 3, true).unwrap();
        let err = b.append(&wire).unwrap_err().to_string();
        assert!(err.contains("element 1 is inf"), "{err}");
        let mut b = GradientBuffer::new(&v, DType::Bf16, 3, true).unwrap();
        let slot = b.direct_slot(3).unwrap();
        assert_eq!(slot.len(), 6, "bf16 arrives as 2 bytes per element, received in place");
        let mut bytes = Vec::new();
        parasync_tensor::encode_f32(&[0.25, 2.0, -1.0], DType::Bf16, &mut bytes);
        slot.copy_from_slice(&bytes);
        b.commit_direct(3).unwrap();
        let g = b.finish().unwrap();
        assert_eq!(g, Gradient::Bf16(vec![0x3e80, 0x4000, 0xbf80]));
        // a step mixing an f32 and a bf16 gradient averages their values
        s.push_gradient(&v, PushMeta { worker: 0, step: 0, base_version: 0 }, g).unwrap();
        s.push_gradient(&v, PushMeta { worker: 1, step: 0, base_version: 0 }, vec![0.75, 0.0, 3.0]).unwrap();
        assert_eq!(v.snapshot(), (1, vec![0.5, 0.0, 0.0]));
    }

    #[test]
    fn bf16_storage_rounds_updates() {
        let s = store(Mode::Async { num_workers: 1, lr_div_staleness: false });
        s.register(def("h", &[2], DType::Bf16), &Init::Constant(1.0)).unwrap();
        let v = s.get("h").unwrap();
        // 1 - 2^-9 is not representable in bf16 and rounds to nearest even (1.0)
        s.push_gradient(&v, PushMeta { worker: 0, step: 0, base_version: 0 }, vec![1.0 / 512.0, 0.5]).unwrap();
        assert_eq!(v.snapshot().1, vec![1.0, 0.5]);
    }

    #[tokio::test(start_paused = true)]
    async fn values_to_follow_hold_pulls_and_refuse_gradients_until_assigned() {
        let s = Arc::new(store(Mode::Async { num_workers: 1, lr_div_staleness: false }));
        s.register(def("w", &[2], DType::F32), &Init::AssignedLater).unwrap();
        let v = s.get("w").unwrap();
        let err = s.push_gradient(&v, PushMeta { worker: 0, step: 0, base_version: 0 }, vec![1.0, 1.0]).unwrap_err();
        assert!(matches!(err, Error::AwaitingValues { .. }), "{err}");
        let err = s.wait_readable(&v, 0, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, Error::ValuesTimeout { .. }), "{err}");
        let (s2, v2) = (Arc::clone(&s), Arc::clone(&v));
        let waiter = tokio::spawn(async move { s2.wait_readable(&v2, 0, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        s.assign(&v, vec![3.0, 4.0]).unwrap();
        waiter.await.unwrap().unwrap();
        assert_eq!(v.snapshot().1, vec![3.0, 4.0]);
        s.push_gradient(&v, PushMeta { worker: 0, step: 0, base_version: 0 }, vec![1.0, 1.0]).unwrap();
        assert_eq!(v.snapshot().1, vec![2.0, 3.0]);
        // a second worker's copy of the initial values, arriving late, keeps the update
        assert_eq!(s.assign(&v, vec![3.0, 4.0]).unwrap(), (1, false));
        assert_eq!(v.snapshot().1, vec![2.0, 3.0]);
    }

    /// A reader on the runtime waits for a long update without blocking its thread: on a
    /// single-threaded runtime, other tasks keep running while the update holds the lock.
    #[tokio::test(flavor = "current_thread")]
    async fn readers_wait_for_an_update_without_blocking_the_runtime() {
        let s = store(Mode::Async { num_workers: 1, lr_div_staleness: false });
        s.register(def("w", &[4], DType::F32), &Init::Constant(1.5)).unwrap();
        let v = s.get("w").unwrap();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let writer = {
            let v = Arc::clone(&v);
            std::thread::spawn(move || {
                let st = v.write(); // a long update on the blocking pool
                locked_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(400));
                drop(st);
                Instant::now()
            })
        };
        locked_rx.recv().unwrap();
        let reader = {
            let v = Arc::clone(&v);
            tokio::spawn(async move {
                let mut out = Vec::new();
                let version = v.encode_range(0, 4, DType::F32, &mut out).await;
                (Instant::now(), version, out)
            })
        };
        let ticker = tokio::spawn(async {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Instant::now()
        });
        let ticked = ticker.await.unwrap();
        let (read_at, version, out) = reader.await.unwrap();
        let released = writer.join().unwrap();
        assert!(ticked < released, "the other task ran while the update held the lock");
        assert!(read_at >= released, "the read waited for the update");
        assert_eq!(version, 0);
        assert_eq!(out, parasync_tensor::f32_as_le_bytes(&[1.5; 4]));
    }

    #[tokio::test(start_paused = true)]
    async fn sync_pull_waits_and_times_out_naming_missing_workers() {
        let s = Arc::new(store(Mode::Sync { num_workers: 3, replicas_to_aggregate: 3 }));
        s.register(def("w", &[1], DType::F32), &Init::Zeros).unwrap();
        let v = s.get("w").unwrap();
        s.push_gradient(&v, PushMeta { worker: 1, step: 0, base_version: 0 }, vec![1.0]).unwrap();
        let err = s.wait_readable(&v, 1, Duration::from_secs(5)).await.unwrap_err();
        match err {
            Error::StepTimeout { missing, step, .. } => assert_eq!((missing, step), (vec![0, 2], 1)),
            other => panic!("{other}"),
        }
        // and it completes once the rest arrive
        let (s2, v2) = (Arc::clone(&s), Arc::clone(&v));
        let waiter = tokio::spawn(async move { s2.wait_readable(&v2, 1, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        s.push_gradient(&v, PushMeta { worker: 0, step: 0, base_version: 0 }, vec![1.0]).unwrap();
        s.push_gradient(&v, PushMeta { worker: 2, step: 0, base_version: 0 }, vec![1.0]).unwrap();
        waiter.await.unwrap().unwrap();
    }
}
