//! Sparse embedding tables: rows of `dim` elements keyed by `u64` ids, created on first use
//! (after admission), updated only where a step pushed, and evicted when a shard's table is
//! full.
//!
//! A table on a shard is split into stripes by a hash of the id, each behind its own
//! reader-writer lock: lookups of many workers read at once, and updates of different
//! stripes do not contend. The consistency mode is the server's, as for dense variables: a
//! table has one [`VariableClock`] whose sync steps aggregate the workers' sparse gradients
//! (the mean per id, summed in worker order, so the result never depends on arrival order).
//!
//! Modules: [`def`] (definitions, initial rows, admission and eviction policies), [`rows`]
//! (the row optimizers), [`table`] (one stripe's rows).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parasync_proto::sparse::UniqueIds;
use parasync_tensor::DType;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::consistency::{Mode, PushDecision, ReadGate, VariableClock};
use crate::error::{Error, Result};
use crate::store::{PushMeta, PushResult};

pub mod def;
mod index;
pub mod rows;
pub(crate) mod serve;
pub mod table;

pub use def::{Admission, Eviction, RowInit, TableDef, MAX_DIM};
pub use rows::RowOptimizer;
pub use table::{PackedRows, RowState, RowValues, Rows, StripeState, TableCounts};
use table::IdMap;

/// Tables at least this large (rows per shard, or without a limit) are split into
/// [`STRIPES`] stripes; smaller ones keep one, so their capacity is exact.
const STRIPED_CAPACITY: u64 = 1 << 16;
/// Stripes of a large table.
const STRIPES: usize = 16;
/// When a stripe is full, this share of its capacity is evicted at once (at least one row),
/// so that the policy's scan over the stripe is paid once per that many new rows.
const EVICT_SHARE: usize = 64;

/// One push's gradient: unique ids and their rows (repeated ids summed), in f32.
#[derive(Debug, Default, PartialEq)]
pub struct SparseGrad {
    /// Unique ids, in order of first appearance.
    pub ids: Vec<u64>,
    /// `ids.len() * dim` values.
    pub rows: Vec<f32>,
}

impl SparseGrad {
    /// [`SparseGrad::summed`] taking the request's buffers: when no id repeats (clients send
    /// unique ids) they become the gradient as they are, without a copy.
    pub fn summed_owned(ids: Vec<u64>, rows: Vec<f32>, dim: usize) -> SparseGrad {
        let (mut unique, mut at) = (Vec::new(), Vec::new());
        UniqueIds::keyed(table::id_key()).number(&ids, &mut unique, &mut at);
        if unique.len() == ids.len() {
            return SparseGrad { ids, rows };
        }
        SparseGrad::sum_numbered(unique, &at, &rows, dim)
    }

    /// Sums the rows of repeated ids (in the order they appear: the same input always gives
    /// the same bits). `rows` holds `ids.len() * dim` values.
    pub fn summed(ids: &[u64], rows: &[f32], dim: usize) -> SparseGrad {
        let (mut unique, mut at) = (Vec::new(), Vec::new());
        UniqueIds::keyed(table::id_key()).number(ids, &mut unique, &mut at);
        SparseGrad::sum_numbered(unique, &at, rows, dim)
    }

    /// The gradient of `unique` ids whose rows are the sums of `rows` by `at` (each row's
    /// index into `unique`): an id's first row copied, later ones added in order.
    fn sum_numbered(unique: Vec<u64>, at: &[u32], rows: &[f32], dim: usize) -> SparseGrad {
        let mut out: Vec<f32> = Vec::with_capacity(unique.len() * dim);
        for (&k, row) in at.iter().zip(rows.chunks_exact(dim)) {
            let k = k as usize;
            if out.len() == k * dim {
                out.extend_from_slice(row);
            } else {
                out[k * dim..(k + 1) * dim].iter_mut().zip(row).for_each(|(s, &g)| *s += g);
            }
        }
        SparseGrad { ids: unique, rows: out }
    }

    /// The mean per id of a sync step's gradients, given in worker order: each id's rows are
    /// summed in that order and divided by the number of gradients (a worker that did not
    /// push an id adds zero to it).
    pub fn mean_in_worker_order(grads: Vec<(u32, SparseGrad)>, dim: usize) -> SparseGrad {
        let k = grads.len() as f32;
        let mut it = grads.into_iter().map(|(_, g)| g);
        let Some(mut acc) = it.next() else { return SparseGrad::default() };
        let mut at: IdMap<usize> = acc.ids.iter().enumerate().map(|(k, &id)| (id, k)).collect();
        for g in it {
            for (&id, row) in g.ids.iter().zip(g.rows.chunks_exact(dim)) {
                match at.get(&id) {
                    Some(&k) => acc.rows[k * dim..(k + 1) * dim].iter_mut().zip(row).for_each(|(s, &x)| *s += x),
                    None => {
                        at.insert(id, acc.ids.len());
                        acc.ids.push(id);
                        acc.rows.extend_from_slice(row);
                    }
                }
            }
        }
        acc.rows.iter_mut().for_each(|x| *x /= k);
        acc
    }
}

/// The stripe an id lives in (a hash independent of the one that picks its shard).
fn stripe_of(id: u64, stripes: usize) -> usize {
    if stripes == 1 {
        0
    } else {
        (def::mix64(id ^ 0x5bd1_e995_0000_0000) >> 32) as usize % stripes
    }
}

/// How far one push may move a table's current step (the clock of time-to-live eviction)
/// past the highest step the table has applied: a push's step is taken as at most that
/// highest step plus this window.
///
/// Async and bounded pushes carry the worker's own step, which the server cannot check (in
/// sync mode the clock sets it); a worker that sends a wild one (`u64::MAX` from a bug) would
/// otherwise move the table's notion of "now" to the end of time in one push: every row
/// evicted as too old, and no sweep ever running again. Honest workers step one at a time;
/// a table restored from a checkpoint starts from the highest step of its rows and sweeps;
/// a fresh table reaches a job's step within `step / STEP_WINDOW + 1` pushes.
pub const STEP_WINDOW: u64 = 1 << 20;

/// Consistency state and learning rate of a table.
struct Clock {
    clock: VariableClock<SparseGrad>,
    lr: f32,
    /// The highest step the table's rows were updated at (see [`STEP_WINDOW`]).
    step_seen: u64,
}

impl Clock {
    /// The step a push for `step` is applied at (its rows' time-to-live clock): `step`, but
    /// at most [`STEP_WINDOW`] past the highest step applied so far, which it becomes if it
    /// is higher.
    fn bounded_step(&mut self, step: u64) -> u64 {
        let step = step.min(self.step_seen.saturating_add(STEP_WINDOW));
        self.step_seen = self.step_seen.max(step);
        step
    }
}

/// Lookup and push counters of a table.
#[derive(Debug, Default)]
pub struct TableTraffic {
    /// Lookup calls, and rows they returned.
    pub lookups: AtomicU64,
    pub rows_looked_up: AtomicU64,
    /// Gradient rows of accepted pushes (after summing repeated ids).
    pub rows_pushed: AtomicU64,
    /// Row payload bytes received and sent.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// One table on one shard.
pub struct SparseTable {
    /// Its definition.
    pub def: TableDef,
    stripes: Vec<RwLock<Rows>>,
    clock: Mutex<Clock>,
    /// Bumped after every applied update (lookups waiting for a step watch it).
    changed: watch::Sender<u64>,
    mode: Mode,
    /// Traffic counters.
    pub traffic: TableTraffic,
    /// Called as sync steps complete (see [`SparseTables::set_step_hook`]).
    hook: HookCell,
    /// A push reached the table's clock since it was created or restored.
    pushed: AtomicBool,
    /// The shard's memory budget, for a table without a capacity (whose rows are taken from
    /// it as they are created; a table with one reserved it whole when created).
    budget: std::sync::OnceLock<Arc<MemoryBudget>>,
    /// The log said that the budget ran out.
    budget_warned: AtomicBool,
}

/// Bytes of a shard's values, slots and table rows, against `--max-shard-bytes`.
#[derive(Debug)]
pub struct MemoryBudget {
    /// Bytes held or reserved.
    pub held: AtomicU64,
    /// At most this many.
    pub max: u64,
}

impl MemoryBudget {
    /// A budget of `max` bytes, none held.
    pub fn new(max: u64) -> MemoryBudget {
        MemoryBudget { held: AtomicU64::new(0), max }
    }

    /// Takes `want` bytes, or as many as are left; returns how many it took.
    pub fn take_up_to(&self, want: u64) -> u64 {
        let mut took = 0;
        let _ = self.held.fetch_update(Relaxed, Relaxed, |held| {
            took = want.min(self.max.saturating_sub(held));
            Some(held + took)
        });
        took
    }

    /// Gives back `bytes` taken before.
    pub fn give(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Relaxed);
    }
}

/// A table's state for info and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct TableStatus {
    /// Rows held.
    pub rows: u64,
    /// Counters summed over the stripes.
    pub counts: TableCounts,
    /// Version (completed sync steps, or applied pushes).
    pub version: u64,
    /// Current learning rate.
    pub learning_rate: f32,
    /// Bytes allocated for rows and their bookkeeping.
    pub allocated_bytes: u64,
}

impl SparseTable {
    /// An empty table for `def` (validated) in `mode`.
    pub fn new(def: TableDef, mode: Mode) -> Self {
        let stripes = if def.capacity == 0 || def.capacity >= STRIPED_CAPACITY { STRIPES } else { 1 };
        let per_stripe = def.capacity.div_ceil(stripes as u64) as usize;
        let evict_batch = (per_stripe / EVICT_SHARE).max(1);
        let stripes = (0..stripes).map(|_| RwLock::new(Rows::new(&def, per_stripe, evict_batch))).collect();
        let lr = def.optimizer.learning_rate();
        SparseTable {
            def,
            stripes,
            clock: Mutex::new(Clock { clock: VariableClock::new(mode), lr, step_seen: 0 }),
            changed: watch::channel(0).0,
            mode,
            traffic: TableTraffic::default(),
            hook: HookCell::default(),
            pushed: AtomicBool::new(false),
            budget: std::sync::OnceLock::new(),
            budget_warned: AtomicBool::new(false),
        }
    }

    /// Whether a push reached the table since it was created or restored (in this process).
    pub fn pushed(&self) -> bool {
        self.pushed.load(Relaxed)
    }

    /// Elements per row.
    pub fn dim(&self) -> usize {
        self.def.dim as usize
    }

    /// Rows of `ids` into `out` (`ids.len() * dim`): held rows, or the initial rows of ids
    /// without one. Repeated ids are fine.
    pub fn lookup(&self, ids: &[u64], out: &mut [f32]) {
        self.lookup_wire(ids, DType::F32, parasync_tensor::f32_as_le_bytes_mut(out));
    }

    /// [`SparseTable::lookup`] with the rows written as `wire` into `out`
    /// (`ids.len() * dim * wire.size()` bytes): what a reply sends.
    pub fn lookup_wire(&self, ids: &[u64], wire: DType, out: &mut [u8]) {
        let row_bytes = self.dim() * wire.size();
        assert_eq!(out.len(), ids.len() * row_bytes, "lookup: output of the wrong size");
        if self.stripes.len() == 1 {
            self.stripes[0].read().lookup_rows(&self.def, ids.iter().copied().zip(out.chunks_exact_mut(row_bytes)), wire);
        } else {
            let order = self.by_stripe(ids);
            // Every position's row of `out`, handed to the stripe that holds its id.
            let mut rows_out: Vec<Option<&mut [u8]>> = out.chunks_exact_mut(row_bytes).map(Some).collect();
            for (s, members) in order.iter().enumerate() {
                if members.is_empty() {
                    continue;
                }
                let rows = self.stripes[s].read();
                let members = members.iter().map(|&i| (ids[i], rows_out[i].take().expect("each position once")));
                rows.lookup_rows(&self.def, members, wire);
            }
        }
        self.traffic.lookups.fetch_add(1, Relaxed);
        self.traffic.rows_looked_up.fetch_add(ids.len() as u64, Relaxed);
    }

    /// Positions of `ids` grouped by stripe.
    fn by_stripe(&self, ids: &[u64]) -> Vec<Vec<usize>> {
        let mut order = vec![Vec::new(); self.stripes.len()];
        for (i, &id) in ids.iter().enumerate() {
            order[stripe_of(id, self.stripes.len())].push(i);
        }
        order
    }

    /// Applies `grad` (unique ids) at learning rate `lr` for `step` (as bounded by
    /// [`Clock::bounded_step`]).
    fn apply(&self, grad: &SparseGrad, lr: f32, step: u64) {
        let dim = self.dim();
        if self.stripes.len() == 1 {
            let rows = grad.ids.iter().copied().zip(grad.rows.chunks_exact(dim));
            self.apply_to_stripe(0, rows, grad.ids.len(), lr, step);
            return;
        }
        for (s, members) in self.by_stripe(&grad.ids).iter().enumerate() {
            if members.is_empty() {
                continue;
            }
            let rows = members.iter().map(|&i| (grad.ids[i], &grad.rows[i * dim..(i + 1) * dim]));
            self.apply_to_stripe(s, rows, members.len(), lr, step);
        }
    }

    /// Applies `n` gradient rows to stripe `s`. A table without a capacity takes the bytes of
    /// the rows it may create from the shard's memory budget first, and gives back what it
    /// did not use (and what rows evicted by their time to live held): past the budget, new
    /// rows are not created and their updates are dropped (counted, and said once in the log).
    fn apply_to_stripe<'g>(&self, s: usize, rows: impl Iterator<Item = (u64, &'g [f32])>, n: usize, lr: f32, step: u64) {
        let Some(budget) = self.budget.get() else {
            self.stripes[s].write().push_rows(&self.def, rows, lr, step);
            return;
        };
        let row_bytes = self.def.row_bytes().max(1);
        let granted = budget.take_up_to(n as u64 * row_bytes);
        let room = (granted / row_bytes) as usize;
        let mut stripe = self.stripes[s].write();
        let (before, dropped_before) = (stripe.len() as u64, stripe.counts().dropped);
        stripe.push_rows_within(&self.def, rows, lr, step, room);
        let (after, dropped_after) = (stripe.len() as u64, stripe.counts().dropped);
        drop(stripe);
        let kept = after.saturating_sub(before) * row_bytes;
        budget.give(granted - kept.min(granted) + before.saturating_sub(after) * row_bytes);
        if room < n && dropped_after > dropped_before && !self.budget_warned.swap(true, Relaxed) {
            tracing::warn!(
                table = %self.def.name,
                rows = after,
                max_shard_bytes = budget.max,
                "the shard's memory limit is reached: this table (no capacity) creates no more rows, and updates of ids \
                 without one are dropped; give the table a capacity and an eviction policy, or raise --max-shard-bytes"
            );
        }
    }

    /// A worker's push of `grad` (unique ids, see [`SparseGrad::summed`]) as the server's mode
    /// decides: applied now (async, bounded), held for its sync step, applied with the other
    /// workers' as the step completes, or dropped as late. The rows are updated at the push's
    /// step (sync: the step completed) for time-to-live eviction, but at most
    /// [`STEP_WINDOW`] past the highest step the table has applied.
    pub fn push(&self, meta: PushMeta, grad: SparseGrad) -> Result<PushResult> {
        let rows = grad.ids.len() as u64;
        let mut clock = self.clock.lock();
        let decision = clock
            .clock
            .on_push(meta.worker, meta.step, meta.base_version, grad)
            .map_err(|refusal| Error::Refused { variable: self.def.name.clone(), refusal })?;
        if !self.pushed.load(Relaxed) {
            self.pushed.store(true, Relaxed);
        }
        let mut result = PushResult { accepted: true, dropped_stale: false, version: 0, staleness: 0, duplicate: false };
        // The hook that took the table as a completed sync step left it, and that step.
        let mut captured = None;
        match decision {
            PushDecision::Apply { grad, staleness, lr_scale } => {
                let lr = clock.lr * lr_scale;
                result.version = clock.clock.version();
                result.staleness = staleness;
                let step = clock.bounded_step(meta.step);
                if matches!(self.mode, Mode::Async { .. }) {
                    // Nothing reads behind an async update: apply it outside the clock.
                    drop(clock);
                    self.apply(&grad, lr, step);
                } else {
                    // Bounded: a read gate that opens must find the update applied.
                    self.apply(&grad, lr, step);
                    drop(clock);
                }
            }
            PushDecision::Buffered { .. } => {
                result.version = clock.clock.version();
            }
            PushDecision::ApplyMean { step, grads } => {
                let mean = SparseGrad::mean_in_worker_order(grads, self.dim());
                let step = clock.bounded_step(step);
                self.apply(&mean, clock.lr, step);
                result.version = clock.clock.version();
                // Handed over before the clock is released: the table cannot complete the
                // next step before the hook has this one.
                if let Some((hook, capture)) = self.wanted_capture(&clock, result.version) {
                    hook.table_captured(capture);
                    captured = Some((hook, result.version));
                }
                drop(clock);
            }
            PushDecision::DropStale { .. } => {
                result.accepted = false;
                result.dropped_stale = true;
                result.version = clock.clock.version();
                return Ok(result);
            }
        }
        self.traffic.rows_pushed.fetch_add(rows, Relaxed);
        self.changed.send_modify(|c| *c += 1);
        if let Some((hook, step)) = captured {
            hook.after_capture(step);
        }
        Ok(result)
    }

    /// Waits until a lookup for `step` may be served (sync: the step completed; bounded:
    /// the slowest worker is close enough), or fails after `timeout` naming the missing
    /// workers. Returns the version.
    pub async fn wait_readable(&self, step: u64, timeout: Duration) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let (gate, version) = {
                let c = self.clock.lock();
                (c.clock.read_gate(step), c.clock.version())
            };
            let missing = match gate {
                ReadGate::Ready => return Ok(version),
                ReadGate::Wait { missing } => missing,
            };
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Error::ShuttingDown),
                Err(_) => {
                    return Err(Error::StepTimeout { variable: self.def.name.clone(), step, version, waited: timeout, missing })
                }
            }
        }
    }

    /// Sets the learning rate of later updates.
    pub fn set_learning_rate(&self, lr: f32) {
        self.clock.lock().lr = lr;
    }

    /// Whether `id` has a row.
    pub fn contains(&self, id: u64) -> bool {
        self.stripes[stripe_of(id, self.stripes.len())].read().contains(id)
    }

    /// Rows, counters, version and rate as they are now.
    pub fn status(&self) -> TableStatus {
        let (version, learning_rate) = {
            let c = self.clock.lock();
            (c.clock.version(), c.lr)
        };
        let mut status = TableStatus { rows: 0, counts: TableCounts::default(), version, learning_rate, allocated_bytes: 0 };
        for s in &self.stripes {
            let r = s.read();
            let c = r.counts();
            status.rows += r.len() as u64;
            status.counts.admitted += c.admitted;
            status.counts.evicted += c.evicted;
            status.counts.dropped += c.dropped;
            status.counts.updated += c.updated;
            status.counts.admission_resets += c.admission_resets;
            status.allocated_bytes += r.allocated_bytes();
        }
        status
    }
}

/// The tables of one shard.
pub struct SparseTables {
    mode: Mode,
    tables: DashMap<String, Arc<SparseTable>>,
    /// Accept NaN / Inf in gradients.
    allow_non_finite: bool,
    /// Shared with every table (see [`SparseTables::set_step_hook`]).
    hook: HookCell,
    /// The shard's memory budget, handed to tables without a capacity.
    budget: std::sync::OnceLock<Arc<MemoryBudget>>,
}

impl SparseTables {
    /// No tables yet; `mode` is the server's.
    pub fn new(mode: Mode, allow_non_finite: bool) -> Self {
        SparseTables { mode, tables: DashMap::new(), allow_non_finite, hook: HookCell::default(), budget: Default::default() }
    }

    /// Bounds the rows of tables without a capacity by the shard's memory budget (the
    /// store's, see [`crate::store::VariableStore`]): tables created after this take from it.
    pub fn set_budget(&self, budget: Arc<MemoryBudget>) {
        let _ = self.budget.set(budget);
    }

    /// Hands the shard's budget to `table` if it has no capacity of its own.
    fn bound(&self, table: &SparseTable) {
        if let (0, Some(b)) = (table.def.capacity, self.budget.get()) {
            let _ = table.budget.set(Arc::clone(b));
        }
    }

    /// Creates `def`'s table, or confirms an identical one; `Ok(true)` if created.
    pub fn register(&self, def: TableDef) -> Result<bool> {
        def.validate().map_err(|reason| Error::invalid(&def.name, reason))?;
        match self.tables.entry(def.name.clone()) {
            dashmap::mapref::entry::Entry::Occupied(e) => {
                let diff = e.get().def.differences(&def);
                if diff.is_empty() {
                    Ok(false)
                } else {
                    Err(Error::Conflict { variable: def.name.clone(), reason: diff.join("; ") })
                }
            }
            dashmap::mapref::entry::Entry::Vacant(e) => {
                let mut table = SparseTable::new(def, self.mode);
                table.hook = Arc::clone(&self.hook);
                self.bound(&table);
                e.insert(Arc::new(table));
                Ok(true)
            }
        }
    }

    /// The table named `name`.
    pub fn get(&self, name: &str) -> Result<Arc<SparseTable>> {
        self.tables.get(name).map(|t| Arc::clone(&t)).ok_or_else(|| Error::NotFound { variable: name.to_string() })
    }

    /// Every table, by name.
    pub fn list(&self) -> Vec<Arc<SparseTable>> {
        let mut v: Vec<Arc<SparseTable>> = self.tables.iter().map(|t| Arc::clone(&t)).collect();
        v.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        v
    }

    /// Appends the tables' metrics in the Prometheus text format (`shard` and `table` labels).
    pub fn render_metrics(&self, shard: u32, out: &mut String) {
        use std::fmt::Write;
        let tables = self.list();
        if tables.is_empty() {
            return;
        }
        let rows: Vec<(Arc<SparseTable>, TableStatus)> = tables.into_iter().map(|t| {
            let s = t.status();
            (t, s)
        }).collect();
        type Get = fn(&SparseTable, &TableStatus) -> u64;
        let series: [(&str, &str, &str, Get); 10] = [
            ("parasync_table_rows", "gauge", "Rows a table holds.", |_, s| s.rows),
            ("parasync_table_bytes", "gauge", "Bytes allocated for a table's rows, slots and index.", |_, s| s.allocated_bytes),
            ("parasync_table_rows_admitted_total", "counter", "Rows created.", |_, s| s.counts.admitted),
            ("parasync_table_rows_evicted_total", "counter", "Rows evicted.", |_, s| s.counts.evicted),
            ("parasync_table_updates_dropped_total", "counter", "Row updates dropped (not admitted yet, the table was full, or the shard's memory limit was reached).", |_, s| s.counts.dropped),
            ("parasync_table_lookups_total", "counter", "Lookup calls.", |t, _| t.traffic.lookups.load(Relaxed)),
            ("parasync_table_rows_looked_up_total", "counter", "Rows returned by lookups.", |t, _| t.traffic.rows_looked_up.load(Relaxed)),
            ("parasync_table_rows_pushed_total", "counter", "Gradient rows pushed (after summing repeated ids).", |t, _| t.traffic.rows_pushed.load(Relaxed)),
            ("parasync_table_bytes_in_total", "counter", "Row bytes received.", |t, _| t.traffic.bytes_in.load(Relaxed)),
            ("parasync_table_bytes_out_total", "counter", "Row bytes sent.", |t, _| t.traffic.bytes_out.load(Relaxed)),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (t, s) in &rows {
                let table = t.def.name.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "{name}{{shard=\"{shard}\",table=\"{table}\"}} {}", get(t, s));
            }
        }
    }

    /// Checks a push's rows (`ids.len() * dim` finite values unless allowed) and sums repeated
    /// ids: the gradient to hand to [`SparseTable::push`].
    pub fn gradient(&self, table: &SparseTable, ids: Vec<u64>, rows: Vec<f32>) -> Result<SparseGrad> {
        let dim = table.dim();
        if rows.len() != ids.len() * dim {
            return Err(Error::invalid(
                &table.def.name,
                format!("{} ids need {} row values ({} per row), got {}", ids.len(), ids.len() * dim, dim, rows.len()),
            ));
        }
        if !self.allow_non_finite {
            if let Some(i) = parasync_tensor::first_non_finite(&rows) {
                return Err(Error::invalid(
                    &table.def.name,
                    format!("gradient row of id {} holds a non-finite value ({}) at element {}", ids[i / dim], rows[i], i % dim),
                ));
            }
        }
        Ok(SparseGrad::summed_owned(ids, rows, dim))
    }
}

/// Told by the tables as their sync steps complete: how a checkpointer takes a table exactly
/// as a step left it (see [`SparseTables::set_step_hook`]).
pub trait TableStepHook: Send + Sync {
    /// Is the state of a table that has just completed `step` steps (its version) wanted?
    /// Asked while the table's clock is held: must be quick.
    fn wants_step(&self, step: u64) -> bool;
    /// A table's state as of the version it just reached, handed over while the table's
    /// clock is still held (so the table cannot complete another step before the hook has
    /// this one): must be quick, and must not take any table's clock.
    fn table_captured(&self, capture: TableCapture);
    /// Called after [`TableStepHook::table_captured`] once the table's clock is released
    /// (no lock held), with the step of the capture: the place for work that takes other
    /// tables' clocks.
    fn after_capture(&self, step: u64);
}

/// The hook of a shard's tables, shared by the registry and every table.
type HookCell = Arc<std::sync::OnceLock<Arc<dyn TableStepHook>>>;

/// A table's whole state as of one version, taken for a checkpoint: its definition, clock
/// and learning rate, and a copy of every stripe (rows, slots, row bookkeeping, admission
/// counters, counters).
pub struct TableCapture {
    pub def: TableDef,
    /// Completed sync steps, or applied pushes.
    pub version: u64,
    /// Bounded mode: each worker's pushed steps (empty in the other modes).
    pub worker_clocks: Vec<u64>,
    pub learning_rate: f32,
    stripes: Vec<Rows>,
}

impl TableCapture {
    /// Rows held.
    pub fn rows(&self) -> u64 {
        self.stripes.iter().map(|s| s.len() as u64).sum()
    }

    /// The held rows of every stripe, stripe after stripe (each sorted by id), with the
    /// admission counters alike; and each stripe's tick, last sweep and counters.
    pub fn packed(&self) -> (PackedRows, Vec<StripeState>) {
        let states = self.stripes.iter().map(|s| s.stripe_state()).collect();
        let mut parts = self.stripes.iter().map(|s| s.packed());
        let mut all = parts.next().unwrap_or_else(|| PackedRows::empty(self.def.dim as usize, self.def.dtype, self.def.optimizer.num_slots()));
        for p in parts {
            p.route_into(std::slice::from_mut(&mut all), |_| Some(0));
        }
        (all, states)
    }

    /// The counters summed over the stripes.
    pub fn counts(&self) -> TableCounts {
        let mut c = TableCounts::default();
        for s in &self.stripes {
            add_counts(&mut c, &s.counts());
        }
        c
    }
}

fn add_counts(sum: &mut TableCounts, c: &TableCounts) {
    sum.admitted += c.admitted;
    sum.evicted += c.evicted;
    sum.dropped += c.dropped;
    sum.updated += c.updated;
    sum.admission_resets += c.admission_resets;
}

/// A table's state read back from a checkpoint, to create the table with.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoredTable {
    pub def: TableDef,
    pub version: u64,
    /// As [`TableCapture::worker_clocks`].
    pub worker_clocks: Vec<u64>,
    pub learning_rate: f32,
    /// The rows (and admission counters) this shard holds, in any order.
    pub rows: PackedRows,
    /// Each stripe's state as written, when the checkpoint has as many as the table has
    /// stripes (a restore onto the shard count that wrote it); otherwise their states are
    /// folded into one: every stripe starts at the highest tick and last sweep, and the
    /// first holds the counters.
    pub stripes: Vec<StripeState>,
}

impl SparseTable {
    /// The table's whole state now, as of one version. The table's clock is held while every
    /// stripe is copied in turn under its read lock: the table's pushes wait for the copy
    /// (a memory copy of the table: about a second per few GB), its lookups go on.
    /// In async mode an update applied outside the clock may be in some stripes and not yet
    /// in others (its version counted).
    pub fn capture(&self) -> TableCapture {
        let clock = self.clock.lock();
        self.capture_locked(&clock)
    }

    /// The state if the table is at `version` now, `Ok(None)` if it is not there yet, or
    /// `Err(current)` if it is past it.
    pub fn capture_at(&self, version: u64) -> std::result::Result<Option<TableCapture>, u64> {
        let clock = self.clock.lock();
        match clock.clock.version() {
            v if v == version => Ok(Some(self.capture_locked(&clock))),
            v if v < version => Ok(None),
            v => Err(v),
        }
    }

    fn capture_locked(&self, clock: &Clock) -> TableCapture {
        TableCapture {
            def: self.def.clone(),
            version: clock.clock.version(),
            worker_clocks: clock.clock.worker_clocks().to_vec(),
            learning_rate: clock.lr,
            stripes: self.stripes.iter().map(|s| s.read().clone()).collect(),
        }
    }

    /// A sync step just took the table to `version` (its clock held): its state, if the
    /// hook wants that step.
    fn wanted_capture(&self, clock: &Clock, version: u64) -> Option<(Arc<dyn TableStepHook>, TableCapture)> {
        let hook = self.hook.get()?;
        hook.wants_step(version).then(|| (Arc::clone(hook), self.capture_locked(clock)))
    }

    /// A table in `mode` holding the state a checkpoint kept: rows placed in the stripes
    /// their ids hash to; a stripe given more rows than its capacity (a checkpoint of more
    /// shards restored onto fewer) evicts the excess by the table's policy.
    pub fn restored(restored: RestoredTable, mode: Mode) -> std::result::Result<SparseTable, String> {
        let RestoredTable { def, version, worker_clocks, learning_rate, rows, stripes } = restored;
        def.validate()?;
        if !(learning_rate.is_finite() && learning_rate >= 0.0) {
            return Err(format!("learning rate {learning_rate}"));
        }
        let table = SparseTable::new(def, mode);
        let def = &table.def;
        let n = table.stripes.len();
        let mut parts = vec![PackedRows::empty(def.dim as usize, def.dtype, def.optimizer.num_slots()); n];
        rows.check()?;
        if rows.dim != def.dim as usize {
            return Err(format!("rows of {} elements, the table's have {}", rows.dim, def.dim));
        }
        rows.route_into(&mut parts, |id| Some(stripe_of(id, n)));
        // Where the table's time-to-live clock was: its rows' steps and its sweeps.
        let step_seen = rows.meta.iter().map(|m| m.step).chain(stripes.iter().map(|s| s.swept_at)).max().unwrap_or(0);
        drop(rows);
        let states = if stripes.len() == n {
            stripes
        } else {
            let mut folded = StripeState::default();
            for s in &stripes {
                folded.tick = folded.tick.max(s.tick);
                folded.swept_at = folded.swept_at.max(s.swept_at);
                add_counts(&mut folded.counts, &s.counts);
            }
            let rest = StripeState { counts: TableCounts::default(), ..folded };
            (0..n).map(|i| if i == 0 { folded } else { rest }).collect()
        };
        for ((stripe, part), state) in table.stripes.iter().zip(parts).zip(states) {
            let mut r = stripe.write();
            r.restore(def, part, state)?;
            r.trim_to_capacity(def);
        }
        {
            let mut c = table.clock.lock();
            c.clock.restore(version, &worker_clocks)?;
            c.lr = learning_rate;
            c.step_seen = step_seen;
        }
        Ok(table)
    }
}

impl SparseTables {
    /// Has every table, those registered later included, tell `hook` of its completed sync
    /// steps. Only the first hook counts; returns whether it was this one.
    pub fn set_step_hook(&self, hook: Arc<dyn TableStepHook>) -> bool {
        self.hook.set(hook).is_ok()
    }

    /// Creates a table from a checkpoint's state. Fails if the shard has one of that name.
    pub fn insert_restored(&self, restored: RestoredTable) -> Result<()> {
        let name = restored.def.name.clone();
        let mut table = SparseTable::restored(restored, self.mode).map_err(|e| Error::invalid(&name, format!("checkpoint: {e}")))?;
        table.hook = Arc::clone(&self.hook);
        self.bound(&table);
        match self.tables.entry(name.clone()) {
            dashmap::mapref::entry::Entry::Occupied(_) => Err(Error::Conflict { variable: name, reason: "restored twice".into() }),
            dashmap::mapref::entry::Entry::Vacant(e) => {
                e.insert(Arc::new(table));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parasync_tensor::DType;

    fn table(mode: Mode, optimizer: RowOptimizer) -> SparseTable {
        SparseTable::new(
            TableDef {
                name: "emb".into(),
                dim: 2,
                dtype: DType::F32,
                init: RowInit::Zeros,
                optimizer,
                admission: Admission::Always,
                eviction: Eviction::None,
                capacity: 0,
            },
            mode,
        )
    }

    fn meta(worker: u32, step: u64) -> PushMeta {
        PushMeta { worker, step, base_version: 0 }
    }

    #[test]
    fn repeated_ids_in_one_push_are_summed_in_order() {
        let g = SparseGrad::summed(&[5, 3, 5, 5], &[1.0, 2.0, 10.0, 20.0, 0.5, 0.25, 0.125, 0.0625], 2);
        assert_eq!(g.ids, [5, 3]);
        assert_eq!(g.rows, [1.0 + 0.5 + 0.125, 2.0 + 0.25 + 0.0625, 10.0, 20.0]);
        // Taking the buffers: the same sums with repeats, the buffers themselves without.
        let rows = vec![1.0, 2.0, 10.0, 20.0, 0.5, 0.25, 0.125, 0.0625];
        assert_eq!(SparseGrad::summed_owned(vec![5, 3, 5, 5], rows.clone(), 2), g);
        let unique = SparseGrad::summed_owned(vec![5, 3, 4, 6], rows.clone(), 2);
        assert_eq!((unique.ids, unique.rows), (vec![5, 3, 4, 6], rows));
        // Applied once with the sum (Adagrad sees one update of the summed gradient).
        let t = table(Mode::Async { num_workers: 1, lr_div_staleness: false }, RowOptimizer::Adagrad { lr: 1.0, initial_accumulator: 0.0, epsilon: 0.0 });
        t.push(meta(0, 0), SparseGrad::summed(&[7, 7], &[3.0, 4.0, 1.0, -8.0], 2)).unwrap();
        let mut out = [0.0; 2];
        t.lookup(&[7], &mut out);
        // g = (4, −4): acc = 16 → w = −4/4 = −1 and +1.
        assert_eq!(out, [-1.0, 1.0]);
    }

    #[test]
    fn a_sync_step_applies_the_mean_in_worker_order_whatever_the_arrival_order() {
        let run = |order: &[u32]| {
            let t = table(Mode::Sync { num_workers: 3, replicas_to_aggregate: 3 }, RowOptimizer::Sgd { lr: 1.0 });
            for &w in order {
                let (ids, rows): (&[u64], Vec<f32>) = match w {
                    0 => (&[1, 2], vec![0.1, 0.2, 0.3, 0.4]),
                    1 => (&[2], vec![1e-8, 3.0]),
                    _ => (&[2, 9], vec![0.7, 0.8, 5.0, 6.0]),
                };
                t.push(meta(w, 0), SparseGrad::summed(ids, &rows, 2)).unwrap();
            }
            let mut out = vec![0.0; 6];
            t.lookup(&[1, 2, 9], &mut out);
            out
        };
        let a = run(&[0, 1, 2]);
        assert_eq!(a, run(&[2, 1, 0]));
        assert_eq!(a, run(&[1, 2, 0]));
        let expect = |s: f32| -(s / 3.0);
        assert_eq!(a, [expect(0.1), expect(0.2), expect((0.3 + 1e-8) + 0.7), expect((0.4 + 3.0) + 0.8), expect(5.0), expect(6.0)]);
    }

    #[tokio::test]
    async fn sync_lookups_wait_for_their_step() {
        let t = Arc::new(table(Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 }, RowOptimizer::Sgd { lr: 1.0 }));
        t.push(meta(0, 0), SparseGrad::summed(&[1], &[1.0, 1.0], 2)).unwrap();
        let e = t.wait_readable(1, Duration::from_millis(50)).await.unwrap_err();
        assert!(e.to_string().contains("[1]"), "{e}");
        let waiter = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.wait_readable(1, Duration::from_secs(10)).await })
        };
        t.push(meta(1, 0), SparseGrad::summed(&[1], &[3.0, 3.0], 2)).unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), 1);
        let mut out = [0.0; 2];
        t.lookup(&[1], &mut out);
        assert_eq!(out, [-2.0, -2.0]);
    }

    #[test]
    fn metrics_name_each_table() {
        let tables = SparseTables::new(Mode::Async { num_workers: 1, lr_div_staleness: false }, false);
        let def = table(Mode::Async { num_workers: 1, lr_div_staleness: false }, RowOptimizer::Sgd { lr: 1.0 }).def;
        tables.register(def).unwrap();
        let t = tables.get("emb").unwrap();
        t.push(meta(0, 0), SparseGrad::summed(&[1, 2, 1], &[1.0; 6], 2)).unwrap();
        let mut out = String::new();
        tables.render_metrics(3, &mut out);
        assert!(out.contains("parasync_table_rows{shard=\"3\",table=\"emb\"} 2\n"), "{out}");
        assert!(out.contains("parasync_table_rows_pushed_total{shard=\"3\",table=\"emb\"} 2\n"), "{out}");
        assert!(out.contains("# TYPE parasync_table_rows_evicted_total counter"), "{out}");
    }

    #[test]
    fn striped_tables_hold_every_row_once() {
        let t = table(Mode::Async { num_workers: 1, lr_div_staleness: false }, RowOptimizer::Sgd { lr: 1.0 });
        assert_eq!(t.stripes.len(), STRIPES);
        let ids: Vec<u64> = (0..1000).map(|i| i * 7919).collect();
        let rows: Vec<f32> = ids.iter().flat_map(|&id| [id as f32, 1.0]).collect();
        t.push(meta(0, 0), SparseGrad::summed(&ids, &rows, 2)).unwrap();
        let mut out = vec![0.0; 2000];
        t.lookup(&ids, &mut out);
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(out[2 * i..2 * i + 2], [-(id as f32), -1.0]);
        }
        assert_eq!(t.status().rows, 1000);
        assert!(t.stripes.iter().all(|s| s.read().len() > 20), "ids spread over the stripes");
    }

    /// Tables without a capacity take their rows' bytes from the shard's budget: past it no
    /// row is created and the updates are dropped; rows evicted by their time to live give
    /// their bytes back.
    #[test]
    fn a_table_without_a_capacity_is_bounded_by_the_shard_memory() {
        let tables = SparseTables::new(Mode::Async { num_workers: 1, lr_div_staleness: false }, false);
        // Rows of 2 f32 with SGD: 8 bytes each; room for 5 and a bit.
        let budget = Arc::new(MemoryBudget::new(5 * 8 + 3));
        tables.set_budget(Arc::clone(&budget));
        let def = TableDef {
            name: "open".into(),
            dim: 2,
            dtype: DType::F32,
            init: RowInit::Zeros,
            optimizer: RowOptimizer::Sgd { lr: 1.0 },
            admission: Admission::Always,
            eviction: Eviction::Ttl { steps: 2 },
            capacity: 0,
        };
        tables.register(def.clone()).unwrap();
        tables.register(TableDef { name: "bounded".into(), capacity: 100, eviction: Eviction::Lru, ..def }).unwrap();
        let t = tables.get("open").unwrap();
        let push = |ids: &[u64], step: u64| {
            let grad = SparseGrad::summed(ids, &vec![1.0; ids.len() * 2], 2);
            t.push(PushMeta { worker: 0, step, base_version: 0 }, grad).unwrap();
        };
        let ids: Vec<u64> = (0..8).collect();
        push(&ids, 0);
        let s = t.status();
        assert_eq!((s.rows, s.counts.dropped), (5, 3));
        assert_eq!(budget.held.load(Relaxed), 40, "what the rows hold, no more");
        // The held rows are updated again; the others are still dropped.
        push(&ids, 1);
        let s = t.status();
        assert_eq!((s.rows, s.counts.dropped, s.counts.updated), (5, 6, 10));
        let mut out = vec![9.0; 16];
        t.lookup(&ids, &mut out);
        assert_eq!(out.iter().filter(|&&x| x == -2.0).count(), 10, "five rows updated twice");
        assert_eq!(out.iter().filter(|&&x| x == 0.0).count(), 6, "three ids still at their initial row");
        // Much later, other ids: the old rows expire where these land, and give their bytes back.
        for (k, id) in (100..400u64).enumerate() {
            push(&[id], 10 + k as u64);
            assert_eq!(budget.held.load(Relaxed), t.status().rows * 8, "after id {id}");
        }
        assert!(t.status().counts.evicted > 0);
        // The table with a capacity took nothing from the budget.
        tables.get("bounded").unwrap().push(PushMeta { worker: 0, step: 0, base_version: 0 }, SparseGrad::summed(&[1], &[1.0, 1.0], 2)).unwrap();
        assert_eq!(budget.held.load(Relaxed), t.status().rows * 8);
    }

    fn adagrad_table(mode: Mode, capacity: u64) -> SparseTable {
        SparseTable::new(
            TableDef {
                name: "emb".into(),
                dim: 3,
                dtype: DType::F32,
                init: RowInit::Normal { mean: 0.0, stddev: 0.3, seed: 4 },
                optimizer: RowOptimizer::Adagrad { lr: 0.1, initial_accumulator: 0.1, epsilon: 1e-8 },
                admission: Admission::MinCount(2),
                eviction: if capacity > 0 { Eviction::Lru } else { Eviction::None },
                capacity,
            },
            mode,
        )
    }

    /// Every worker's push of sync step `step` (ids spread over the stripes).
    fn sync_step(t: &SparseTable, workers: u32, step: u64) {
        for w in 0..workers {
            let ids: Vec<u64> = (0..6).map(|i| (step * 13 + w as u64 * 5 + i * 7) % 40 * 1_000_003).collect();
            let rows: Vec<f32> = (0..ids.len() * 3).map(|i| ((i as f32 + w as f32) * 0.37 + step as f32).cos()).collect();
            t.push(meta(w, step), SparseGrad::summed(&ids, &rows, 3)).unwrap();
        }
    }

    fn every_row(t: &SparseTable) -> Vec<u32> {
        let ids: Vec<u64> = (0..40).map(|i| i * 1_000_003).collect();
        let mut out = vec![0.0; ids.len() * 3];
        t.lookup(&ids, &mut out);
        out.iter().map(|x| x.to_bits()).collect()
    }

    fn restored_of(c: &TableCapture) -> RestoredTable {
        let (rows, stripes) = c.packed();
        RestoredTable { def: c.def.clone(), version: c.version, worker_clocks: c.worker_clocks.clone(), learning_rate: c.learning_rate, rows, stripes }
    }

    #[test]
    fn a_captured_table_restores_and_goes_on_as_the_original() {
        let mode = Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 };
        for capacity in [0, 12] {
            let t = adagrad_table(mode, capacity);
            for step in 0..8 {
                sync_step(&t, 2, step);
            }
            t.set_learning_rate(0.07);
            let c = t.capture();
            assert_eq!((c.version, c.rows()), (8, t.status().rows));
            let back = SparseTable::restored(restored_of(&c), mode).unwrap();
            let same = |t: &SparseTable| TableStatus { allocated_bytes: 0, ..t.status() };
            assert_eq!(same(&back), same(&t), "capacity {capacity}: rows, counters, version and learning rate");
            assert_eq!(every_row(&back), every_row(&t));
            for step in 8..14 {
                sync_step(&t, 2, step);
                sync_step(&back, 2, step);
            }
            assert_eq!(every_row(&back), every_row(&t), "capacity {capacity}: the same bits after six more steps");
            assert_eq!(same(&back), same(&t));
            // The capture kept the table as it was.
            assert_eq!(c.version, 8);
        }
    }

    #[test]
    fn a_restore_onto_another_stripe_layout_keeps_every_row_and_the_counter_sums() {
        let mode = Mode::Async { num_workers: 1, lr_div_staleness: false };
        let t = adagrad_table(mode, 0);
        for step in 0..6 {
            sync_step(&t, 1, step);
        }
        let c = t.capture();
        let mut r = restored_of(&c);
        r.stripes.truncate(3); // not the table's sixteen: folded
        let sums = {
            let mut s = TableCounts::default();
            r.stripes.iter().for_each(|x| add_counts(&mut s, &x.counts));
            s
        };
        let back = SparseTable::restored(r, mode).unwrap();
        assert_eq!(every_row(&back), every_row(&t));
        assert_eq!(back.status().counts, sums);
        assert_eq!(back.status().rows, t.status().rows);
    }

    /// An async table of SGD rows that live `ttl` steps (one stripe: every push sweeps it).
    fn ttl_table(ttl: u64) -> SparseTable {
        let mode = Mode::Async { num_workers: 1, lr_div_staleness: false };
        let def = TableDef { eviction: Eviction::Ttl { steps: ttl }, capacity: 1000, ..table(mode, RowOptimizer::Sgd { lr: 1.0 }).def };
        let t = SparseTable::new(def, mode);
        assert_eq!(t.stripes.len(), 1);
        t
    }

    fn push_one(t: &SparseTable, id: u64, step: u64) {
        t.push(meta(0, step), SparseGrad::summed(&[id], &[1.0, 1.0], 2)).unwrap();
    }

    #[test]
    fn a_wild_worker_step_moves_the_time_to_live_clock_by_at_most_the_window() {
        let t = ttl_table(10);
        push_one(&t, 1, 0);
        push_one(&t, 2, 5);
        // A worker's step of u64::MAX counts as the highest step so far plus the window.
        push_one(&t, 3, u64::MAX);
        let now = 5 + STEP_WINDOW;
        assert!(t.contains(3));
        push_one(&t, 4, now + 5);
        assert!(t.contains(3) && t.contains(4), "no sweep yet: within ten steps of the wild one");
        // Sweeps go on: eleven steps on, the row of the wild step is older than ten.
        push_one(&t, 5, now + 11);
        assert!(!t.contains(3), "the row pushed at the wild step is swept as one of that step");
        assert!(t.contains(4) && t.contains(5));
        push_one(&t, 6, now + 30);
        assert!(!t.contains(4) && !t.contains(5) && t.contains(6), "and later sweeps still run");
        assert_eq!(t.status().counts.evicted, 5);
    }

    #[test]
    fn a_restored_table_keeps_its_time_to_live_clock_past_the_window() {
        const W: u64 = STEP_WINDOW;
        let t = ttl_table(10);
        // Honest steps one window apart reach 3W; the last row lives at 3W.
        for (id, step) in [(1, 0), (2, W), (3, 2 * W), (4, 3 * W), (5, 3 * W + 4)] {
            push_one(&t, id, step);
        }
        assert!(t.contains(4) && t.contains(5) && !t.contains(3));
        let mode = Mode::Async { num_workers: 1, lr_div_staleness: false };
        let back = SparseTable::restored(restored_of(&t.capture()), mode).unwrap();
        // A push at 3W + 11 is no jump for the restored table: it sweeps the row of 3W as the original does.
        for x in [&t, &back] {
            push_one(x, 6, 3 * W + 11);
            assert!(!x.contains(4) && x.contains(5) && x.contains(6));
        }
    }

    struct Wants(u64, Mutex<Vec<TableCapture>>);

    impl TableStepHook for Wants {
        fn wants_step(&self, step: u64) -> bool {
            step % self.0 == 0
        }
        fn table_captured(&self, capture: TableCapture) {
            self.1.lock().push(capture);
        }
        fn after_capture(&self, _step: u64) {}
    }

    #[test]
    fn the_step_hook_takes_a_table_as_each_wanted_step_leaves_it() {
        let mode = Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 };
        let tables = SparseTables::new(mode, false);
        let hook = Arc::new(Wants(3, Mutex::new(Vec::new())));
        assert!(tables.set_step_hook(hook.clone()));
        assert!(!tables.set_step_hook(hook.clone()), "the first hook stays");
        let def = adagrad_table(mode, 0).def;
        tables.register(def.clone()).unwrap();
        let t = tables.get("emb").unwrap();
        let reference = adagrad_table(mode, 0);
        let mut at_three = Vec::new();
        for step in 0..7 {
            sync_step(&t, 2, step);
            sync_step(&reference, 2, step);
            if step == 2 {
                at_three = every_row(&reference);
            }
        }
        let taken = hook.1.lock();
        assert_eq!(taken.iter().map(|c| c.version).collect::<Vec<_>>(), [3, 6]);
        let back = SparseTable::restored(restored_of(&taken[0]), mode).unwrap();
        assert_eq!(every_row(&back), at_three, "as step 3 left it, though the table went on");

        // A restored table is found by a registration of the same definition.
        let restored = SparseTables::new(mode, false);
        restored.insert_restored(restored_of(&taken[1])).unwrap();
        assert!(!restored.register(def.clone()).unwrap(), "found, not created");
        assert!(restored.insert_restored(restored_of(&taken[1])).is_err(), "restored twice");
        let mut other = def;
        other.dim = 4;
        assert!(restored.register(other).is_err());
    }
}
