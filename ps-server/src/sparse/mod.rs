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

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::consistency::{Mode, PushDecision, ReadGate, VariableClock};
use crate::error::{Error, Result};
use crate::store::{PushMeta, PushResult};

pub mod def;
pub mod rows;
pub(crate) mod serve;
pub mod table;

pub use def::{Admission, Eviction, RowInit, TableDef, MAX_DIM};
pub use rows::RowOptimizer;
pub use table::{Rows, TableCounts};
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
    /// Sums the rows of repeated ids (in the order they appear: the same input always gives
    /// the same bits). `rows` holds `ids.len() * dim` values.
    pub fn summed(ids: &[u64], rows: &[f32], dim: usize) -> SparseGrad {
        let mut at: IdMap<usize> = IdMap::default();
        at.reserve(ids.len());
        let mut out = SparseGrad { ids: Vec::with_capacity(ids.len()), rows: Vec::with_capacity(rows.len()) };
        for (&id, row) in ids.iter().zip(rows.chunks_exact(dim)) {
            match at.get(&id) {
                Some(&k) => out.rows[k * dim..(k + 1) * dim].iter_mut().zip(row).for_each(|(s, &g)| *s += g),
                None => {
                    at.insert(id, out.ids.len());
                    out.ids.push(id);
                    out.rows.extend_from_slice(row);
                }
            }
        }
        out
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

/// Consistency state and learning rate of a table.
struct Clock {
    clock: VariableClock<SparseGrad>,
    lr: f32,
}

/// Lookup and push counters of a table.
#[derive(Debug, Default)]
pub struct TableTraffic {
    /// Lookup calls, and rows they returned.
    pub lookups: AtomicU64,
    pub rows_looked_up: AtomicU64,
    /// Push calls accepted, and gradient rows they carried (after summing repeated ids).
    pub pushes: AtomicU64,
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
            clock: Mutex::new(Clock { clock: VariableClock::new(mode), lr }),
            changed: watch::channel(0).0,
            mode,
            traffic: TableTraffic::default(),
        }
    }

    /// Elements per row.
    pub fn dim(&self) -> usize {
        self.def.dim as usize
    }

    /// Rows of `ids` into `out` (`ids.len() * dim`): held rows, or the initial rows of ids
    /// without one. Repeated ids are fine.
    pub fn lookup(&self, ids: &[u64], out: &mut [f32]) {
        let dim = self.dim();
        assert_eq!(out.len(), ids.len() * dim, "lookup: output of the wrong size");
        if self.stripes.len() == 1 {
            self.stripes[0].read().lookup(&self.def, ids, out);
        } else {
            let order = self.by_stripe(ids);
            let mut one = vec![0f32; dim];
            for (s, members) in order.iter().enumerate() {
                if members.is_empty() {
                    continue;
                }
                let rows = self.stripes[s].read();
                for &i in members {
                    rows.lookup(&self.def, &ids[i..i + 1], &mut one);
                    out[i * dim..(i + 1) * dim].copy_from_slice(&one);
                }
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

    /// Applies `grad` (unique ids) at learning rate `lr` for `step`.
    fn apply(&self, grad: &SparseGrad, lr: f32, step: u64) {
        if self.stripes.len() == 1 {
            self.stripes[0].write().push(&self.def, &grad.ids, &grad.rows, lr, step);
            return;
        }
        let dim = self.dim();
        for (s, members) in self.by_stripe(&grad.ids).iter().enumerate() {
            if members.is_empty() {
                continue;
            }
            let ids: Vec<u64> = members.iter().map(|&i| grad.ids[i]).collect();
            let mut rows = Vec::with_capacity(members.len() * dim);
            for &i in members {
                rows.extend_from_slice(&grad.rows[i * dim..(i + 1) * dim]);
            }
            self.stripes[s].write().push(&self.def, &ids, &rows, lr, step);
        }
    }

    /// A worker's push of `grad` (unique ids, see [`SparseGrad::summed`]) as the server's mode
    /// decides: applied now (async, bounded), held for its sync step, applied with the other
    /// workers' as the step completes, or dropped as late.
    pub fn push(&self, meta: PushMeta, grad: SparseGrad) -> Result<PushResult> {
        let rows = grad.ids.len() as u64;
        let mut clock = self.clock.lock();
        let decision = clock
            .clock
            .on_push(meta.worker, meta.step, meta.base_version, grad)
            .map_err(|refusal| Error::Refused { variable: self.def.name.clone(), refusal })?;
        let mut result = PushResult { accepted: true, dropped_stale: false, version: 0, staleness: 0, duplicate: false };
        match decision {
            PushDecision::Apply { grad, staleness, lr_scale } => {
                let lr = clock.lr * lr_scale;
                result.version = clock.clock.version();
                result.staleness = staleness;
                if matches!(self.mode, Mode::Async { .. }) {
                    // Nothing reads behind an async update: apply it outside the clock.
                    drop(clock);
                    self.apply(&grad, lr, meta.step);
                } else {
                    // Bounded: a read gate that opens must find the update applied.
                    self.apply(&grad, lr, meta.step);
                    drop(clock);
                }
            }
            PushDecision::Buffered { .. } => {
                result.version = clock.clock.version();
            }
            PushDecision::ApplyMean { step, grads } => {
                let mean = SparseGrad::mean_in_worker_order(grads, self.dim());
                self.apply(&mean, clock.lr, step);
                result.version = clock.clock.version();
                drop(clock);
            }
            PushDecision::DropStale { .. } => {
                result.accepted = false;
                result.dropped_stale = true;
                result.version = clock.clock.version();
                return Ok(result);
            }
        }
        self.traffic.pushes.fetch_add(1, Relaxed);
        self.traffic.rows_pushed.fetch_add(rows, Relaxed);
        self.changed.send_modify(|c| *c += 1);
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

    /// Whether `id` has a row.
    pub fn contains(&self, id: u64) -> bool {
        self.stripes[stripe_of(id, self.stripes.len())].read().contains(id)
    }
}

/// The tables of one shard.
pub struct SparseTables {
    mode: Mode,
    tables: DashMap<String, Arc<SparseTable>>,
    /// Accept NaN / Inf in gradients.
    allow_non_finite: bool,
}

impl SparseTables {
    /// No tables yet; `mode` is the server's.
    pub fn new(mode: Mode, allow_non_finite: bool) -> Self {
        SparseTables { mode, tables: DashMap::new(), allow_non_finite }
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
                e.insert(Arc::new(SparseTable::new(def, self.mode)));
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
            ("parasync_table_updates_dropped_total", "counter", "Row updates dropped (not admitted yet, or the table was full).", |_, s| s.counts.dropped),
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
    pub fn gradient(&self, table: &SparseTable, ids: &[u64], rows: &[f32]) -> Result<SparseGrad> {
        let dim = table.dim();
        if rows.len() != ids.len() * dim {
            return Err(Error::invalid(
                &table.def.name,
                format!("{} ids need {} row values ({} per row), got {}", ids.len(), ids.len() * dim, dim, rows.len()),
            ));
        }
        if !self.allow_non_finite {
            if let Some(i) = parasync_tensor::first_non_finite(rows) {
                return Err(Error::invalid(
                    &table.def.name,
                    format!("gradient row of id {} holds a non-finite value ({}) at element {}", ids[i / dim], rows[i], i % dim),
                ));
            }
        }
        Ok(SparseGrad::summed(ids, rows, dim))
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
}
