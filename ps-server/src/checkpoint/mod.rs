//! Checkpoints of a shard: when they are taken, how they are written, and restore.
//!
//! A checkpoint is a folder `DIR/step-<n>/` holding, per shard, `shard-<i>-of-<S>.safetensors`
//! (each variable's values under its name, each optimizer slot as `<name>:<slot>`) and
//! `shard-<i>-of-<S>.json`, its manifest (definitions, versions, learning rates, update
//! counts, the file's size and CRC-32). Once every shard's manifest is there, `manifest.json`
//! joins them: whole variables and the row ranges of their parts, and under `tables` each
//! sparse table's rows and version per shard.
//!
//! **Sparse tables** are in the same shard file, each as these tensors (`<t>` its name):
//!
//! | tensor | dtype, shape | holds |
//! |---|---|---|
//! | `table:<t>:ids` | U64 `[rows]` | the ids of the rows held, stripe after stripe, each stripe's sorted |
//! | `table:<t>:values` | F32 or BF16 (the storage dtype) `[rows, dim]` | row `k` is id `ids[k]`'s |
//! | `table:<t>:<slot>` | F32 `[rows, dim]` | each optimizer slot: `accumulator` (Adagrad), `m` and `v` (Adam), `linear` and `accumulator` (FTRL) |
//! | `table:<t>:meta` | U64 `[rows, 4]` | per row: the stripe tick of its last update, its updates since created, its own step count (lazy Adam's `t`), the step of its last update |
//! | `table:<t>:seen_ids`, `table:<t>:seen_counts` | U64 `[seen]`, U32 `[seen]` | ids still waiting for admission, and how often each was seen |
//!
//! The shard manifest's `tables` lists, per table, its definition (`dim`, `dtype`, `init`,
//! `optimizer`, `admission`, `eviction`, `capacity`), `version`, `learning_rate`,
//! `worker_clocks` (bounded mode), `rows`, `seen`, `counts` (admitted, evicted, dropped,
//! updated, admission resets), `stripes` (each stripe's `tick`, `swept_at` and counters)
//! and `tensors` (the names above). Manifests without `tables` (written before tables
//! existed) load as checkpoints without tables.
//!
//! A restore re-creates every table of the shard's file before the shard serves, with its
//! rows, slots, row bookkeeping, admission counts, counters, version and learning rate (a
//! client's registration of the same table then finds it, `created = false`). Onto another
//! shard count, rows cannot be cut by ranges: each new shard reads every old file's tables
//! and keeps the rows and admission counts whose ids route to it (`shard_of_id`); see
//! [`Checkpoint::read_tables_routed`] for the counters and clocks.
//!
//! A table is taken by copying its rows (a memory copy of the table, under each stripe's
//! read lock in turn while the table's clock is held: the table's pushes wait for it, its
//! lookups do not). In sync mode each table is taken under its clock the moment a sync step
//! takes it to the checkpoint's step (or, if it is at that step when the variables are all
//! in, then); a table found past the step, not taken at it, fails that checkpoint as a
//! variable past it does. The tables are told of the checkpointer when the store gets it
//! ([`VariableStore::set_checkpointer`]). On a shard that holds variables, the variables
//! complete a checkpoint: its tables are kept for the steps of `--checkpoint-every-steps`
//! once a variable was pushed (a step the tables completed before any variable was pushed
//! is skipped). A shard whose only state is tables (dense variables are placed whole on
//! one shard, so in a job of a few small variables and large tables most shards hold table
//! rows only) writes the same checkpoints: its tables complete them, each taken as the step
//! left it, the checkpoint written once every table is in. A sync checkpoint still waiting
//! when a later one is complete is failed (logged: it can no longer be completed), and so is
//! one waiting for a table that no push has reached since the shard started (registered and
//! never used) once a later checkpoint step has every variable in: such a table would hold
//! every checkpoint open, each with copies of the other tables. In async and bounded mode every
//! table is taken as it is when the checkpoint is taken, its version recorded: at the first
//! push of a checkpoint step, a variable's or a table's.
//!
//! **When.** In sync mode a checkpoint of step `n` holds every variable exactly as step `n`
//! left it: the state is taken (shared, not copied) the moment a variable completes step
//! `n`, so pushes for step `n + 1` wait for no more than the copy an update makes of values
//! a checkpoint still reads. Every shard of a job writes the same steps (every
//! `--checkpoint-every-steps` steps, or the step a chief asks for). In async and bounded
//! mode there are no steps to cut at: a checkpoint holds each variable at one version, taken
//! when the first push of a worker's step `n` arrives (each variable's version is in the
//! manifest; variables apart are not cut at one instant).
//!
//! **Every S seconds** (`--checkpoint-every-s`): shards share no clock and no step counter
//! they could cut at on their own, so they agree through the workers. A shard whose time
//! has come names a step in its push replies (`checkpoint_due`: two steps past the newest
//! it has seen in sync mode, one in async and bounded); each worker passes it on in its
//! pushes of the steps up to it (`checkpoint_step`, in dense and sparse pushes alike: a
//! shard of tables alone names steps and takes them too), which reach every shard. In sync mode
//! no variable can complete that step before a push of every worker arrives, so every
//! shard takes the same step; in async and bounded mode each shard takes its variables
//! when the first push passing the step on arrives. Every shard restarts its timer then.
//! (With `--replicas-to-aggregate` below the worker count a step can complete without the
//! push that passes it on: a shard whose variables are past the step logs that it skips
//! it, and that checkpoint stays incomplete.)
//!
//! **Atomic.** Files are written under a temporary name, fsynced and renamed, the manifest
//! last, then the folder is fsynced: a shard killed at any moment leaves the checkpoints it
//! finished intact, and a file without its manifest (or whose checksum does not match) is
//! never restored. Old checkpoints beyond `--keep-checkpoints` are removed.

pub mod manifest;
pub mod restore;
pub mod safetensors;
pub mod tool;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::consistency::Mode;
use crate::sparse::{TableCapture, TableStepHook};
use crate::store::{VariableCapture, VariableStore};
use manifest::{
    CountsEntry, FileEntry, Manifest, OptimizerEntry, PartEntry, ShardManifest, StripeEntry, TableEntry, TableShardEntry, TableTensors,
    VariableEntry, WholeTable, WholeVariable, FORMAT,
};
pub use restore::Checkpoint;

/// Where and how often a shard writes checkpoints.
#[derive(Clone, Debug)]
pub struct CheckpointSettings {
    pub dir: PathBuf,
    /// Every this many steps (0: only when asked).
    pub every_steps: u64,
    /// About every this long (see the module's docs); `None`: off.
    pub every: Option<Duration>,
    /// Checkpoints kept (the newest); at least 1.
    pub keep: usize,
    pub shard: u32,
    pub num_shards: u32,
}

/// A checkpoint written.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub step: u64,
    /// The shard's safetensors file.
    pub path: PathBuf,
    pub bytes: u64,
    pub seconds: f64,
    /// Every shard's part of this checkpoint was there once this one's was written.
    pub complete: bool,
}

type Waiter = oneshot::Sender<Result<Outcome, String>>;

/// A checkpoint whose variables are still being taken.
#[derive(Default)]
struct Pending {
    captures: HashMap<String, VariableCapture>,
    /// Tables taken as they completed the step (or found at it once the variables were in).
    tables: HashMap<String, TableCapture>,
    /// Once every variable is in: the tables the checkpoint still waits for, by name.
    expected_tables: Option<Vec<String>>,
    waiters: Vec<Waiter>,
}

struct Job {
    step: u64,
    captures: Vec<VariableCapture>,
    tables: Vec<TableCapture>,
    waiters: Vec<Waiter>,
}

/// Takes a shard's checkpoints as its variables reach their steps and writes them on a
/// thread of its own.
pub struct Checkpointer {
    settings: CheckpointSettings,
    mode: Mode,
    pending: Mutex<BTreeMap<u64, Pending>>,
    /// `pending.len()`, read without the lock on every step.
    pending_count: AtomicUsize,
    /// Async / bounded: the worker step whose first push takes the next checkpoint.
    next_async: AtomicU64,
    /// Held while an async / bounded checkpoint takes the variables.
    async_gate: Mutex<()>,
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Time-based checkpoints: the highest step a push carried.
    newest_step: AtomicU64,
    /// Time-based checkpoints: nanoseconds after `epoch` when the next one is due.
    due_at: AtomicU64,
    epoch: Instant,
    timed: Mutex<Timed>,
    /// This checkpointer, for the hook the tables call (see [`Checkpointer::attach`]).
    me: std::sync::Weak<Checkpointer>,
    /// The store whose tables call the hook (set by [`Checkpointer::attach`]): a sync step
    /// of a table may complete a checkpoint of a shard without variables.
    store: std::sync::OnceLock<std::sync::Weak<VariableStore>>,
    /// A variable of the store was pushed: the store's checkpoints of every
    /// `--checkpoint-every-steps` steps get their variables (the tables' steps are kept for
    /// them). A store without variables needs none: its tables' steps are always kept.
    variables_pushed: std::sync::atomic::AtomicBool,
    /// Sync: the newest steps handed to the writer or failed (a table taken late for one
    /// of them is dropped). Locked after `pending`, never before.
    finished: Mutex<std::collections::BTreeSet<u64>>,
}

/// The tables' hook: tells the checkpointer (while it exists) of completed sync steps.
struct StepHook(std::sync::Weak<Checkpointer>);

impl TableStepHook for StepHook {
    fn wants_step(&self, step: u64) -> bool {
        self.0.upgrade().is_some_and(|c| c.wants_table_step(step))
    }

    fn table_captured(&self, capture: TableCapture) {
        if let Some(c) = self.0.upgrade() {
            c.table_captured(capture);
        }
    }

    fn after_capture(&self, step: u64) {
        if let Some(c) = self.0.upgrade() {
            c.after_table_capture(step);
        }
    }
}

/// The state of time-based checkpoints.
#[derive(Default)]
struct Timed {
    /// The step this shard names in its replies while it is due (0: not named yet).
    proposed: u64,
    /// Steps passed on by workers and taken (the newest few), so each is taken once.
    taken: std::collections::BTreeSet<u64>,
}

/// Steps remembered as taken: far more than can be in flight at once.
const TAKEN_KEPT: usize = 64;

impl Checkpointer {
    /// A checkpointer for a shard in `mode` whose state is at `step` (0, or the restored step).
    pub fn start(settings: CheckpointSettings, mode: Mode, step: u64, metrics: Arc<crate::metrics::Metrics>) -> anyhow::Result<Arc<Checkpointer>> {
        std::fs::create_dir_all(&settings.dir).with_context(|| format!("creating {}", settings.dir.display()))?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let every = settings.every_steps;
        let next = if every > 0 { (step / every + 1) * every } else { u64::MAX };
        let c = Arc::new_cyclic(|me| Checkpointer {
            me: me.clone(),
            store: std::sync::OnceLock::new(),
            variables_pushed: std::sync::atomic::AtomicBool::new(false),
            finished: Mutex::new(std::collections::BTreeSet::new()),
            settings,
            mode,
            pending: Mutex::new(BTreeMap::new()),
            pending_count: AtomicUsize::new(0),
            next_async: AtomicU64::new(next),
            async_gate: Mutex::new(()),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            newest_step: AtomicU64::new(step),
            due_at: AtomicU64::new(0),
            epoch: Instant::now(),
            timed: Mutex::new(Timed::default()),
        });
        c.restart_timer();
        let settings = c.settings.clone();
        let mode_name = c.mode.name();
        let handle = std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
            for job in rx {
                let result = write_shard(&settings, mode_name, job.step, &job.captures, job.tables).map_err(|e| format!("{e:#}"));
                drop(job.captures);
                match &result {
                    Ok(o) => {
                        tracing::info!(
                            step = o.step,
                            path = %o.path.display(),
                            mib = o.bytes as f64 / (1 << 20) as f64,
                            seconds = o.seconds,
                            "checkpoint written"
                        );
                        metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
                        metrics.checkpoint_seconds.observe(o.seconds);
                        if let Err(e) = prune(&settings, o.complete) {
                            tracing::warn!("removing old checkpoints: {e:#}");
                        }
                    }
                    Err(e) => {
                        metrics.checkpoint_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(step = job.step, "checkpoint failed: {e}");
                    }
                }
                for w in job.waiters {
                    let _ = w.send(result.clone());
                }
            }
        })?;
        *c.writer.lock() = Some(handle);
        Ok(c)
    }

    /// Stops taking checkpoints, lets the writer finish those taken, and waits for it.
    pub fn finish(&self) {
        self.jobs.lock().take();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }

    /// Sync mode: is the state of a variable that just completed `step` wanted?
    pub fn wants_step(&self, step: u64) -> bool {
        let every = self.settings.every_steps;
        (every > 0 && step > 0 && step % every == 0)
            || (self.pending_count.load(Ordering::Acquire) > 0 && self.pending.lock().contains_key(&step))
    }

    /// Sync mode: a variable's state as of the step it just completed, handed over while the
    /// variable's state is still locked (so the variable cannot complete another step, and
    /// a later checkpoint cannot be complete, before this one has it). Then
    /// [`Checkpointer::after_captured`], with the lock released.
    pub fn captured(&self, capture: VariableCapture) {
        let step = capture.version;
        let mut pending = self.pending.lock();
        if !pending.contains_key(&step) && self.finished.lock().contains(&step) {
            return; // written or failed already
        }
        pending.entry(step).or_default().captures.insert(capture.def.name.clone(), capture);
        self.pending_count.store(pending.len(), Ordering::Release);
    }

    /// Sync mode: after a variable's state at `step` is in ([`Checkpointer::captured`]):
    /// once every variable is, takes the tables and hands the checkpoint to the writer.
    pub fn after_captured(&self, store: &VariableStore, step: u64) {
        if let Err(why) = self.complete_if_ready(store, step) {
            tracing::warn!(step, "checkpoint skipped on this shard: {why}");
        }
    }

    /// Has the store's sparse tables hand their state to this checkpointer as the sync steps
    /// it wants complete, tables registered or restored later included (once; later calls
    /// change nothing). [`VariableStore::set_checkpointer`] does it.
    pub fn attach(&self, store: &Arc<VariableStore>) {
        if self.store.set(Arc::downgrade(store)).is_ok() {
            store.tables().set_step_hook(Arc::new(StepHook(self.me.clone())));
        }
    }

    /// The store attached, while it exists.
    fn attached_store(&self) -> Option<Arc<VariableStore>> {
        self.store.get().and_then(std::sync::Weak::upgrade)
    }

    /// Sync mode: are the tables' states at the steps of `--checkpoint-every-steps` kept? Once
    /// a variable was pushed (its checkpoints get their tables), or while the store holds no
    /// variable (the tables complete its checkpoints). A store with variables none of which
    /// was pushed keeps none: nothing would complete them.
    fn keeps_table_steps(&self) -> bool {
        self.variables_pushed.load(Ordering::Acquire) || self.attached_store().is_some_and(|s| s.is_empty())
    }

    /// Sync mode: is the state of a table that just completed `step` wanted? The steps of
    /// `--checkpoint-every-steps` (see [`Checkpointer::keeps_table_steps`]), and any step
    /// asked for or passed on.
    fn wants_table_step(&self, step: u64) -> bool {
        let every = self.settings.every_steps;
        (every > 0 && step > 0 && step % every == 0 && self.keeps_table_steps())
            || (self.pending_count.load(Ordering::Acquire) > 0 && self.pending.lock().contains_key(&step))
    }

    /// Sync mode: a table's state as of the step it just completed, handed over while the
    /// table's clock is held: it is in the pending checkpoint before the table can complete
    /// another step (a checkpoint that found the table past the step before its state was
    /// in would be failed). Takes no table's clock: see [`Checkpointer::after_table_capture`].
    fn table_captured(&self, capture: TableCapture) {
        let step = capture.version;
        let mut pending = self.pending.lock();
        if self.finished.lock().contains(&step) {
            return; // taken once the variables were in, and written or failed since
        }
        if !pending.contains_key(&step) && !self.keeps_table_steps() {
            return;
        }
        let p = pending.entry(step).or_default();
        p.tables.entry(capture.def.name.clone()).or_insert(capture);
        self.pending_count.store(pending.len(), Ordering::Release);
        self.send_if_complete(&mut pending, step);
    }

    /// Sync mode: after a table's state at `step` is in (its clock released). On a shard
    /// without variables this may be what completes the checkpoint: the other tables at the
    /// step now are taken, and those still before it as they complete it.
    fn after_table_capture(&self, step: u64) {
        // Variables all in (none, on a shard of tables alone): the step waits for the tables only.
        if let Some(store) = self.attached_store() {
            if let Err(why) = self.complete_if_ready(&store, step) {
                tracing::warn!(step, "checkpoint skipped on this shard: {why}");
            }
        }
    }

    /// Once every variable of the store is in checkpoint `step`: takes the tables that are at
    /// `step` now and not in it yet (those still before it are taken as they complete it) and
    /// hands the checkpoint to the writer once every table is in. Fails the checkpoint if a
    /// table has completed a later step already (it was not taken as `step` left it).
    fn complete_if_ready(&self, store: &VariableStore, step: u64) -> Result<(), String> {
        let (names, missing) = {
            let pending = self.pending.lock();
            let Some(p) = pending.get(&step) else { return Ok(()) };
            if p.expected_tables.is_some() {
                return Ok(()); // done before: the tables complete it
            }
            // Counted first: listing the variables for every one taken would be quadratic.
            if p.captures.len() < store.len() || !store.list().iter().all(|v| p.captures.contains_key(&v.def().name)) {
                return Ok(());
            }
            let tables = store.tables().list();
            let names: Vec<String> = tables.iter().map(|t| t.def.name.clone()).collect();
            let missing: Vec<_> = tables.into_iter().filter(|t| !p.tables.contains_key(&t.def.name)).collect();
            (names, missing)
        };
        // Outside the lock: a table's clock is never taken while `pending` is held.
        let mut taken = Vec::new();
        let mut past = Vec::new();
        for t in &missing {
            match t.capture_at(step) {
                Ok(Some(c)) => taken.push(c),
                Ok(None) => {}
                Err(current) => past.push((t.def.name.clone(), current)),
            }
        }
        let mut pending = self.pending.lock();
        let Some(p) = pending.get_mut(&step) else { return Ok(()) };
        if p.expected_tables.is_some() {
            return Ok(());
        }
        for c in taken {
            p.tables.entry(c.def.name.clone()).or_insert(c);
        }
        // One past the step may have been taken by its hook meanwhile.
        if let Some((name, current)) = past.into_iter().find(|(name, _)| !p.tables.contains_key(name)) {
            let why = format!(
                "table {name} has completed step {current} already, past step {step}, and was not taken at it: ask for a step it has not passed"
            );
            self.fail_step(&mut pending, step, &why);
            return Err(why);
        }
        p.expected_tables = Some(names);
        self.send_if_complete(&mut pending, step);
        self.drop_stalled_before(&mut pending, store, step);
        Ok(())
    }

    /// Checkpoint `step` has every variable in: fails the earlier checkpoints still waiting
    /// for a table that no push has reached since the shard started (registered and never
    /// pushed, or restored and not pushed since). Such a table would hold them open for good,
    /// each with its copies of the other tables; a table in use is pushed by every worker
    /// from the first step on, long before another checkpoint step has its variables.
    fn drop_stalled_before(&self, pending: &mut BTreeMap<u64, Pending>, store: &VariableStore, step: u64) {
        let stalled: Vec<(u64, String)> = pending
            .range(..step)
            .filter_map(|(&earlier, p)| {
                let expected = p.expected_tables.as_ref()?;
                let idle = expected
                    .iter()
                    .filter(|n| !p.tables.contains_key(*n))
                    .find(|n| store.tables().get(n).map_or(true, |t| !t.pushed()))?;
                Some((earlier, idle.clone()))
            })
            .collect();
        for (earlier, table) in stalled {
            let why = format!(
                "table {table} has not been pushed since the shard started, and checkpoint {step} has every variable: \
                 checkpoint {earlier} dropped (it would wait for that table for good)"
            );
            tracing::warn!(step = earlier, "checkpoint skipped on this shard: {why}");
            self.fail_step(pending, earlier, &why);
        }
    }

    /// Hands checkpoint `step` to the writer if its variables and every table it waits for are in.
    fn send_if_complete(&self, pending: &mut BTreeMap<u64, Pending>, step: u64) {
        let Some(p) = pending.get(&step) else { return };
        let Some(expected) = &p.expected_tables else { return };
        if !expected.iter().all(|n| p.tables.contains_key(n)) {
            return;
        }
        let mut p = pending.remove(&step).expect("present");
        self.pending_count.store(pending.len(), Ordering::Release);
        self.note_finished(step);
        let mut captures: Vec<VariableCapture> = p.captures.into_values().collect();
        captures.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        let expected = p.expected_tables.take().unwrap_or_default();
        let mut tables: Vec<TableCapture> = expected.iter().filter_map(|n| p.tables.remove(n)).collect();
        tables.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        self.send(Job { step, captures, tables, waiters: p.waiters });
        // Every variable and table is past the earlier steps still waiting: those not in
        // them by now were not taken as those steps left them, and never will be.
        let earlier: Vec<u64> = pending.range(..step).map(|(&s, _)| s).collect();
        for s in earlier {
            let why = format!("checkpoint {step} is complete first: checkpoint {s} can no longer get every variable and table as step {s} left them");
            tracing::warn!(step = s, "checkpoint skipped on this shard: {why}");
            self.fail_step(pending, s, &why);
        }
    }

    /// Drops checkpoint `step` (its waiters hear `why`).
    fn fail_step(&self, pending: &mut BTreeMap<u64, Pending>, step: u64, why: &str) {
        if let Some(p) = pending.remove(&step) {
            fail(p.waiters, why);
        }
        self.pending_count.store(pending.len(), Ordering::Release);
        self.note_finished(step);
    }

    fn note_finished(&self, step: u64) {
        let mut f = self.finished.lock();
        f.insert(step);
        while f.len() > TAKEN_KEPT {
            f.pop_first();
        }
    }

    /// Every table of the store as it is now (async / bounded checkpoints).
    fn tables_now(store: &VariableStore) -> Vec<TableCapture> {
        store.tables().list().iter().map(|t| t.capture()).collect()
    }

    fn send(&self, job: Job) {
        let jobs = self.jobs.lock();
        match jobs.as_ref() {
            Some(tx) => {
                if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
                    fail(job.waiters, "the checkpoint writer has stopped");
                }
            }
            None => fail(job.waiters, "the shard is shutting down"),
        }
    }

    /// A push of a variable for a worker's `step` is about to be applied. Async / bounded
    /// mode: the first push of a checkpoint step takes every variable's and table's state
    /// first (see [`Checkpointer::before_table_push`]).
    pub fn before_push(&self, store: &VariableStore, step: u64) {
        if !self.variables_pushed.load(Ordering::Acquire) {
            self.variables_pushed.store(true, Ordering::Release);
        }
        self.before_step_push(store, step);
    }

    /// A push of a table's rows for a worker's `step` is about to be applied. Async /
    /// bounded mode: as [`Checkpointer::before_push`], so a shard whose only state is tables
    /// writes the same checkpoints (sync mode: nothing to do, the tables' completed steps
    /// take them).
    pub fn before_table_push(&self, store: &VariableStore, step: u64) {
        self.before_step_push(store, step);
    }

    /// Async / bounded mode: the first push (of a variable or a table) of a checkpoint step
    /// takes every variable's and table's state before it is applied.
    fn before_step_push(&self, store: &VariableStore, step: u64) {
        let every = self.settings.every_steps;
        if every == 0 || matches!(self.mode, Mode::Sync { .. }) || step < self.next_async.load(Ordering::Acquire) {
            return;
        }
        // Every push of a checkpoint step waits here until the variables are taken, so
        // none of them is applied first (pushes of earlier steps go on meanwhile).
        let _taking = self.async_gate.lock();
        let next = self.next_async.load(Ordering::Acquire);
        if step >= next {
            let at = step / every * every;
            self.send(Job { step: at, captures: store.capture_all(), tables: Self::tables_now(store), waiters: Vec::new() });
            self.next_async.store(at + every, Ordering::Release);
        }
    }

    /// A checkpoint of `step` asked for by a client. Sync: every variable as `step` leaves
    /// it (now, for those already there; as the others get there); a variable already past
    /// `step` fails the request (tables alike: a shard of tables alone answers too). Async /
    /// bounded: every variable and table as it is now, named `step`.
    pub fn request(&self, store: &VariableStore, step: u64) -> oneshot::Receiver<Result<Outcome, String>> {
        let (tx, rx) = oneshot::channel();
        if !matches!(self.mode, Mode::Sync { .. }) {
            self.send(Job { step, captures: store.capture_all(), tables: Self::tables_now(store), waiters: vec![tx] });
        } else if let Err(why) = self.take_at(store, step, Some(tx)) {
            tracing::debug!(step, "checkpoint request refused: {why}");
        }
        rx
    }

    /// Sync mode: takes every variable of the store as `step` leaves it, handing the
    /// checkpoint (and `waiter`) to the writer once all are taken. Fails (and fails the
    /// waiters) if a variable has completed a later step already.
    fn take_at(&self, store: &VariableStore, step: u64, waiter: Option<Waiter>) -> Result<(), String> {
        {
            let mut pending = self.pending.lock();
            let p = pending.entry(step).or_default();
            p.waiters.extend(waiter);
            self.pending_count.store(pending.len(), Ordering::Release);
        }
        // Registered first: a variable that completes `step` from here on is taken by
        // `captured`; those already there are taken now.
        for var in store.list() {
            match store.capture_at(&var, step) {
                Ok(Some(c)) => match self.pending.lock().get_mut(&step) {
                    Some(p) => {
                        p.captures.insert(c.def.name.clone(), c);
                    }
                    None => return Ok(()), // completed meanwhile, by the variables reaching `step`
                },
                Ok(None) => {}
                Err(current) => {
                    let why = format!(
                        "variable {} has completed step {current} already, past step {step}: ask for a step it has not passed",
                        var.def().name
                    );
                    let mut pending = self.pending.lock();
                    self.fail_step(&mut pending, step, &why);
                    return Err(why);
                }
            }
        }
        self.complete_if_ready(store, step)
    }

    /// Time-based checkpoints: notes a push of `step` and returns the step this shard asks
    /// the worker to pass on (its reply's `checkpoint_due`), 0 while it is not due.
    pub fn on_push(&self, step: u64) -> u64 {
        if self.settings.every.is_none() {
            return 0;
        }
        self.newest_step.fetch_max(step, Ordering::AcqRel);
        if (self.epoch.elapsed().as_nanos() as u64) < self.due_at.load(Ordering::Acquire) {
            return 0;
        }
        let mut t = self.timed.lock();
        if t.proposed == 0 {
            // Sync: two steps on, so that no worker can have pushed it anywhere before it
            // hears of it (a worker's next step needs this one complete on every shard).
            let ahead = if matches!(self.mode, Mode::Sync { .. }) { 2 } else { 1 };
            let after_taken = t.taken.last().map_or(0, |&s| s + 1);
            t.proposed = (self.newest_step.load(Ordering::Acquire) + ahead).max(after_taken);
        }
        t.proposed
    }

    /// A push passes on checkpoint `step` (named by some shard's reply): the first time
    /// this shard hears of it, it takes it (sync: as the step leaves each variable; async
    /// / bounded: every variable now, before the push is applied) and restarts its timer.
    pub fn passed_on(&self, store: &VariableStore, step: u64) {
        {
            let mut t = self.timed.lock();
            if !t.taken.insert(step) {
                return;
            }
            while t.taken.len() > TAKEN_KEPT {
                t.taken.pop_first();
            }
            if t.proposed <= step {
                t.proposed = 0;
            }
            self.restart_timer();
        }
        if matches!(self.mode, Mode::Sync { .. }) {
            if let Err(why) = self.take_at(store, step, None) {
                tracing::warn!(step, "timed checkpoint skipped on this shard: {why}");
            }
        } else {
            let _taking = self.async_gate.lock();
            self.send(Job { step, captures: store.capture_all(), tables: Self::tables_now(store), waiters: Vec::new() });
        }
    }

    fn restart_timer(&self) {
        if let Some(every) = self.settings.every {
            let at = self.epoch.elapsed() + every;
            self.due_at.store(at.as_nanos() as u64, Ordering::Release);
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.jobs.get_mut().take();
    }
}

fn fail(waiters: Vec<Waiter>, why: &str) {
    for w in waiters {
        let _ = w.send(Err(why.to_string()));
    }
}

/// The file names of a shard's part of a checkpoint: data and manifest.
pub fn shard_file_names(shard: u32, num_shards: u32) -> (String, String) {
    let base = format!("shard-{shard}-of-{num_shards}");
    (format!("{base}.safetensors"), format!("{base}.json"))
}

/// The key of a slot's tensor.
pub fn slot_tensor_name(variable: &str, slot: &str) -> String {
    format!("{variable}:{slot}")
}

/// The key of one of a sparse table's tensors (`ids`, `values`, `meta`, `seen_ids`,
/// `seen_counts`, or a slot's name).
pub fn table_tensor_name(table: &str, part: &str) -> String {
    format!("table:{table}:{part}")
}

/// A table's tensors ready to write: its packed rows and their bytes.
struct TableOut {
    entry: TableEntry,
    slot_names: &'static [&'static str],
    rows: crate::sparse::PackedRows,
    ids: Vec<u8>,
    meta: Vec<u8>,
    seen_ids: Vec<u8>,
    seen_counts: Vec<u8>,
}

impl TableOut {
    /// Packs a table's capture (a copy of its rows in the file's layout, made on the writer's thread).
    fn new(t: &TableCapture) -> TableOut {
        let (rows, stripes) = t.packed();
        let name = &t.def.name;
        let mut entry = TableEntry::of_def(&t.def);
        entry.version = t.version;
        entry.learning_rate = t.learning_rate;
        entry.worker_clocks = t.worker_clocks.clone();
        entry.rows = rows.len() as u64;
        entry.seen = rows.seen_ids.len() as u64;
        entry.counts = CountsEntry::new(&t.counts());
        entry.stripes = stripes.iter().map(StripeEntry::new).collect();
        entry.tensors = TableTensors {
            ids: table_tensor_name(name, "ids"),
            values: table_tensor_name(name, "values"),
            meta: table_tensor_name(name, "meta"),
            seen_ids: table_tensor_name(name, "seen_ids"),
            seen_counts: table_tensor_name(name, "seen_counts"),
            slots: t.def.optimizer.slot_names().iter().map(|s| (s.to_string(), table_tensor_name(name, s))).collect(),
        };
        let meta: Vec<u64> = rows.meta.iter().flat_map(|m| [m.tick, m.updates as u64, m.steps as u64, m.step]).collect();
        TableOut {
            ids: safetensors::u64_le_bytes(&rows.ids),
            meta: safetensors::u64_le_bytes(&meta),
            seen_ids: safetensors::u64_le_bytes(&rows.seen_ids),
            seen_counts: safetensors::u32_le_bytes(&rows.seen_counts),
            slot_names: t.def.optimizer.slot_names(),
            entry,
            rows,
        }
    }

    /// Its tensors, in the order they are written.
    fn tensors(&self) -> Vec<safetensors::TensorOut<'_>> {
        use safetensors::{Dtype, TensorOut};
        let (n, dim) = (self.rows.len() as u64, self.entry.dim as u64);
        let names = &self.entry.tensors;
        let values = match &self.rows.values {
            crate::sparse::RowValues::F32(v) => (Dtype::F32, parasync_tensor::f32_as_le_bytes(v)),
            crate::sparse::RowValues::Bf16(v) => (Dtype::Bf16, parasync_tensor::u16_as_le_bytes(v)),
        };
        let mut out = vec![
            TensorOut { name: names.ids.clone(), dtype: Dtype::U64, shape: vec![n], data: &self.ids },
            TensorOut { name: names.values.clone(), dtype: values.0, shape: vec![n, dim], data: values.1 },
        ];
        for (slot, data) in self.slot_names.iter().zip(&self.rows.slots) {
            out.push(TensorOut { name: names.slots[*slot].clone(), dtype: Dtype::F32, shape: vec![n, dim], data: parasync_tensor::f32_as_le_bytes(data) });
        }
        out.push(TensorOut { name: names.meta.clone(), dtype: Dtype::U64, shape: vec![n, 4], data: &self.meta });
        let seen = self.rows.seen_ids.len() as u64;
        out.push(TensorOut { name: names.seen_ids.clone(), dtype: Dtype::U64, shape: vec![seen], data: &self.seen_ids });
        out.push(TensorOut { name: names.seen_counts.clone(), dtype: Dtype::U32, shape: vec![seen], data: &self.seen_counts });
        out
    }
}

fn dtype_str(dtype: parasync_tensor::DType) -> &'static str {
    match dtype {
        parasync_tensor::DType::F32 => "f32",
        parasync_tensor::DType::Bf16 => "bf16",
    }
}

/// Writes one shard's part of checkpoint `step`: data file, then manifest, each under a
/// temporary name, fsynced and renamed; then the folder is fsynced.
pub fn write_shard(
    settings: &CheckpointSettings,
    mode: &str,
    step: u64,
    captures: &[VariableCapture],
    tables: Vec<TableCapture>,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let dir = settings.dir.join(format!("step-{step}"));
    if !dir.exists() {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fsync_dir(&settings.dir)?;
    }
    let (data_name, manifest_name) = shard_file_names(settings.shard, settings.num_shards);
    let slot_tensors: Vec<Vec<(String, String, &[u8])>> = captures
        .iter()
        .map(|c| {
            let names = c.def.optimizer.slot_names();
            names
                .iter()
                .zip(&c.optimizer.slots)
                .map(|(s, data)| (s.to_string(), slot_tensor_name(&c.def.name, s), parasync_tensor::f32_as_le_bytes(data)))
                .collect()
        })
        .collect();
    let mut tensors = Vec::new();
    for (c, slots) in captures.iter().zip(&slot_tensors) {
        tensors.push(safetensors::TensorOut { name: c.def.name.clone(), dtype: c.def.dtype.into(), shape: c.def.shape.clone(), data: c.values_le_bytes() });
        for (_, key, data) in slots {
            tensors.push(safetensors::TensorOut { name: key.clone(), dtype: safetensors::Dtype::F32, shape: c.def.shape.clone(), data });
        }
    }
    // Each table packed in the file's layout (a copy), its capture dropped once packed.
    let table_outs: Vec<TableOut> = tables.into_iter().map(|t| TableOut::new(&t)).collect();
    for t in &table_outs {
        tensors.extend(t.tensors());
    }
    let metadata = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("step".to_string(), step.to_string()),
        ("shard".to_string(), settings.shard.to_string()),
        ("num_shards".to_string(), settings.num_shards.to_string()),
    ]);
    // A manifest of an earlier write of this step would vouch for the new file otherwise.
    let manifest_path = dir.join(&manifest_name);
    match std::fs::remove_file(&manifest_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).context("removing an older manifest"),
        _ => {}
    }
    let data_tmp = dir.join(format!(".{data_name}.tmp"));
    let written = safetensors::write(&data_tmp, &tensors, &metadata)?;
    std::fs::rename(&data_tmp, dir.join(&data_name)).context("renaming the checkpoint file")?;

    let manifest = ShardManifest {
        format: FORMAT.into(),
        step,
        mode: mode.into(),
        shard: settings.shard,
        num_shards: settings.num_shards,
        file: data_name.clone(),
        bytes: written.bytes,
        crc32: format!("{:08x}", written.crc32),
        written_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        variables: captures
            .iter()
            .zip(&slot_tensors)
            .map(|(c, slots)| VariableEntry {
                name: c.def.name.clone(),
                shape: c.def.shape.clone(),
                dtype: dtype_str(c.def.dtype).into(),
                optimizer: OptimizerEntry::new(&c.def.optimizer),
                stochastic_rounding: c.def.stochastic_rounding,
                version: c.version,
                learning_rate: c.optimizer.lr,
                updates: c.optimizer.updates,
                worker_clocks: c.worker_clocks.clone(),
                last_pushes: c.last_pushes.iter().map(|&(w, id, r)| manifest::LastPush::new(w, id, r)).collect(),
                tensor: c.def.name.clone(),
                slots: slots.iter().map(|(s, key, _)| (s.clone(), key.clone())).collect(),
            })
            .collect(),
        tables: table_outs.iter().map(|t| t.entry.clone()).collect(),
    };
    drop(tensors);
    drop(table_outs);
    write_json_atomically(&dir, &manifest_name, settings.shard, &manifest)?;
    fsync_dir(&dir)?;
    let complete = write_joined_manifest(&dir, settings.shard).unwrap_or_else(|e| {
        tracing::warn!("writing {}/manifest.json: {e:#}", dir.display());
        false
    });
    Ok(Outcome { step, path: dir.join(data_name), bytes: written.bytes, seconds: started.elapsed().as_secs_f64(), complete })
}

/// Writes `value` to `dir/name` through the temporary `.{name}.{writer}.tmp` (shards that
/// write the same file at once each use their own).
fn write_json_atomically<T: serde::Serialize>(dir: &Path, name: &str, writer: u32, value: &T) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.{writer}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        serde_json::to_writer_pretty(&mut f, value)?;
        std::io::Write::write_all(&mut f, b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("fsync of {}", dir.display()))
}

/// Writes `manifest.json` in checkpoint folder `dir` once every shard's manifest is there
/// (whichever shard finishes last writes it; the same content whoever does).
/// Returns whether the checkpoint is complete.
fn write_joined_manifest(dir: &Path, writer: u32) -> anyhow::Result<bool> {
    let mut shards: BTreeMap<u32, ShardManifest> = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("shard-") && name.ends_with(".json") {
            if let Ok(m) = serde_json::from_slice::<ShardManifest>(&std::fs::read(dir.join(name))?) {
                shards.insert(m.shard, m);
            }
        }
    }
    let Some(first) = shards.values().next() else { return Ok(false) };
    let (step, num_shards) = (first.step, first.num_shards);
    if shards.len() != num_shards as usize || shards.values().any(|m| m.step != step || m.num_shards != num_shards) {
        return Ok(false); // not complete yet
    }
    write_json_atomically(dir, "manifest.json", writer, &joined_manifest(shards.values()))?;
    fsync_dir(dir)?;
    Ok(true)
}

/// The whole-checkpoint manifest of a complete set of shard manifests.
pub fn joined_manifest<'a>(shards: impl Iterator<Item = &'a ShardManifest> + Clone) -> Manifest {
    let first = shards.clone().next().expect("at least one shard");
    let files =
        shards.clone().map(|m| FileEntry { shard: m.shard, file: m.file.clone(), bytes: m.bytes, crc32: m.crc32.clone() }).collect();
    let mut wholes: BTreeMap<String, Vec<(u64, u32, &VariableEntry)>> = BTreeMap::new();
    for m in shards.clone() {
        for v in &m.variables {
            let (base, part, _) = manifest::split_part_name(&v.name);
            wholes.entry(base.to_string()).or_default().push((part, m.shard, v));
        }
    }
    let variables = wholes
        .into_iter()
        .map(|(name, mut parts)| {
            parts.sort_by_key(|p| p.0);
            let v0 = parts[0].2;
            let mut row = 0;
            let parts: Vec<PartEntry> = parts
                .iter()
                .map(|(_, shard, v)| {
                    let rows = [row, row + v.shape[0]];
                    row = rows[1];
                    PartEntry { name: v.name.clone(), shard: *shard, rows }
                })
                .collect();
            let mut shape = v0.shape.clone();
            shape[0] = row;
            WholeVariable { name, shape, dtype: v0.dtype.clone(), optimizer: v0.optimizer.clone(), parts }
        })
        .collect();
    let mut tables: BTreeMap<String, WholeTable> = BTreeMap::new();
    for m in shards {
        for t in &m.tables {
            let whole = tables.entry(t.name.clone()).or_insert_with(|| WholeTable {
                name: t.name.clone(),
                dim: t.dim,
                dtype: t.dtype.clone(),
                optimizer: t.def().map_or_else(|_| "?".to_string(), |d| d.optimizer.name().to_string()),
                rows: 0,
                version: 0,
                shards: Vec::new(),
            });
            whole.rows += t.rows;
            whole.version = whole.version.max(t.version);
            whole.shards.push(TableShardEntry { shard: m.shard, rows: t.rows, version: t.version });
        }
    }
    let tables = tables.into_values().collect();
    Manifest { format: FORMAT.into(), step: first.step, mode: first.mode.clone(), num_shards: first.num_shards, files, variables, tables }
}

/// Removes the checkpoints older than the newest `keep` complete ones (every shard's
/// manifest there): the whole folder when this shard just completed a checkpoint (`all`),
/// else this shard's files (and its temporary ones of writes that never finished), the
/// folder too once nothing else is left in it. Nothing newer than the `keep`-th complete
/// checkpoint is touched, so a shard that runs ahead never removes the last checkpoint the
/// others have finished.
fn prune(settings: &CheckpointSettings, all: bool) -> anyhow::Result<()> {
    let (data_name, manifest_name) = shard_file_names(settings.shard, settings.num_shards);
    let complete = |dir: &Path| (0..settings.num_shards).all(|i| dir.join(shard_file_names(i, settings.num_shards).1).is_file());
    let mut kept = 0usize;
    for (_, dir) in restore::step_dirs(&settings.dir)? {
        if kept < settings.keep.max(1) {
            if complete(&dir) {
                kept += 1;
            }
            continue;
        }
        if all {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing {}", dir.display())),
                _ => continue,
            }
        }
        let tmp_manifest = format!(".{manifest_name}.{}.tmp", settings.shard);
        for name in [manifest_name.clone(), data_name.clone(), format!(".{data_name}.tmp"), tmp_manifest] {
            match std::fs::remove_file(dir.join(&name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing {name}")),
                _ => {}
            }
        }
        let others = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()).any(|e| e.file_name() != "manifest.json");
        if !others {
            let _ = std::fs::remove_file(dir.join("manifest.json"));
            let _ = std::fs::remove_dir(&dir);
        }
    }
    Ok(())
}

/// Restores `checkpoint` into `store` for shard `shard` of `num_shards`. On the shard count
/// it was written with: every variable of the shard's file now, read in one pass that checks
/// its checksum (a file that fails it restores nothing). On another: each variable as a
/// client registers it, its rows cut from the old files (all of them checked first).
/// Returns the number of variables restored now.
pub fn restore_into(store: &VariableStore, checkpoint: Arc<Checkpoint>, shard: u32, num_shards: u32) -> anyhow::Result<usize> {
    if num_shards == checkpoint.num_shards {
        let (vars, tables) = checkpoint.read_shard_all(shard)?;
        let n = vars.len();
        for (def, restored) in vars {
            let name = def.name.clone();
            store.insert_restored(def, restored).map_err(|e| anyhow::anyhow!("restoring {name}: {e}"))?;
        }
        insert_tables(store, tables)?;
        Ok(n)
    } else {
        if let Some(s) = checkpoint.deferred {
            checkpoint.verify(s)?;
        }
        // Tables are restored now: each old shard file's rows whose ids route to this shard.
        insert_tables(store, checkpoint.read_tables_routed(shard, num_shards)?)?;
        store.set_restore_source(checkpoint);
        Ok(0)
    }
}

fn insert_tables(store: &VariableStore, tables: Vec<crate::sparse::RestoredTable>) -> anyhow::Result<()> {
    for t in tables {
        let (name, rows, version) = (t.def.name.clone(), t.rows.len(), t.version);
        store.insert_restored_table(t).map_err(|e| anyhow::anyhow!("restoring table {name}: {e}"))?;
        tracing::info!(table = %name, rows, version, "table restored");
    }
    Ok(())
}

/// How long a client's checkpoint request may wait for the variables to reach its step.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::optimizer::OptimizerSpec;
    use crate::sparse::{Admission, Eviction, RestoredTable, RowInit, RowOptimizer, SparseGrad, SparseTable, TableDef};
    use crate::store::{Init, PushMeta, StoreConfig, VariableDef};
    use parasync_tensor::DType;

    /// A folder removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!("parasync-ckpt-unit-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn table_def(dtype: DType) -> TableDef {
        TableDef {
            name: "emb".into(),
            dim: 3,
            dtype,
            init: RowInit::Uniform { low: -0.5, high: 0.5, seed: 9 },
            optimizer: RowOptimizer::Adagrad { lr: 0.2, initial_accumulator: 0.1, epsilon: 1e-7 },
            admission: Admission::MinCount(2),
            eviction: Eviction::Lru,
            capacity: 10,
        }
    }

    fn settings(dir: &Path, every_steps: u64, shard: u32, num_shards: u32) -> CheckpointSettings {
        CheckpointSettings { dir: dir.to_path_buf(), every_steps, every: None, keep: 100, shard, num_shards }
    }

    /// A store with a variable `w` and the table `emb`, and a checkpointer writing every `every`
    /// steps that the store does not know of yet.
    fn store_and_checkpointer(mode: Mode, dir: &Path, every: u64) -> (Arc<VariableStore>, Arc<Checkpointer>) {
        let metrics = Arc::new(Metrics::default());
        let store = Arc::new(VariableStore::new(StoreConfig::new(mode), Arc::clone(&metrics)));
        let w = VariableDef {
            name: "w".into(),
            shape: vec![4],
            dtype: DType::F32,
            optimizer: OptimizerSpec::Sgd { lr: 0.5, momentum: 0.0, nesterov: false },
            stochastic_rounding: false,
        };
        store.register(w, &Init::Constant(1.0)).unwrap();
        store.tables().register(table_def(DType::F32)).unwrap();
        let c = Checkpointer::start(settings(dir, every, 0, 1), mode, 0, metrics).unwrap();
        (store, c)
    }

    /// A store with a variable `w` and the table `emb`, writing checkpoints every `every` steps.
    fn store_with_checkpoints(mode: Mode, dir: &Path, every: u64) -> (Arc<VariableStore>, Arc<Checkpointer>) {
        let (store, c) = store_and_checkpointer(mode, dir, every);
        store.set_checkpointer(Arc::clone(&c));
        (store, c)
    }

    fn dense_push(store: &VariableStore, worker: u32, step: u64) {
        let v = store.get("w").unwrap();
        let base_version = v.snapshot().0;
        store.push_gradient(&v, PushMeta { worker, step, base_version }, vec![0.1 * (step + 1) as f32; 4]).unwrap();
    }

    fn ids_of(worker: u32, step: u64) -> Vec<u64> {
        (0..5).map(|i| (step * 3 + worker as u64 * 7 + i * i) % 17).collect()
    }

    fn table_push(t: &SparseTable, worker: u32, step: u64) {
        let ids = ids_of(worker, step);
        let rows: Vec<f32> = (0..ids.len() * 3).map(|i| ((i as f32 + 0.5) * (step as f32 + 1.0 + worker as f32)).sin() * 0.4).collect();
        t.push(PushMeta { worker, step, base_version: t.status().version }, SparseGrad::summed(&ids, &rows, 3)).unwrap();
    }

    fn every_row(t: &SparseTable) -> Vec<u32> {
        let ids: Vec<u64> = (0..20).collect();
        let mut out = vec![0.0; ids.len() * 3];
        t.lookup(&ids, &mut out);
        out.iter().map(|x| x.to_bits()).collect()
    }

    fn status(t: &SparseTable) -> crate::sparse::TableStatus {
        crate::sparse::TableStatus { allocated_bytes: 0, ..t.status() }
    }

    fn table_of(c: &Checkpoint, mode: Mode) -> SparseTable {
        let (_, mut tables) = c.read_shard_all(0).unwrap();
        assert_eq!(tables.len(), 1);
        SparseTable::restored(tables.remove(0), mode).unwrap()
    }

    #[test]
    fn sync_checkpoints_hold_each_table_as_the_step_left_it_though_it_ran_ahead() {
        let dir = TempDir::new("sync-tables");
        let mode = Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 };
        let (store, c) = store_with_checkpoints(mode, &dir.0, 2);
        dense_push(&store, 0, 0); // a variable pushed: the tables' steps are kept for the variables
        let t = store.tables().get("emb").unwrap();
        let mut at = BTreeMap::new();
        for step in 0..4 {
            for w in 0..2 {
                table_push(&t, w, step);
            }
            at.insert(step + 1, (every_row(&t), status(&t)));
        }
        // The variable completes steps 1..4 only now, with the table at version 4.
        dense_push(&store, 1, 0);
        for step in 1..4 {
            for w in 0..2 {
                dense_push(&store, w, step);
            }
        }
        c.finish();
        for step in [2u64, 4] {
            let ck = Checkpoint::load(&dir.0.join(format!("step-{step}"))).unwrap();
            assert_eq!(ck.shards[0].tables.len(), 1);
            let e = &ck.shards[0].tables[0];
            assert_eq!((e.version, e.rows), (step, at[&step].1.rows));
            let back = table_of(&ck, mode);
            assert_eq!(every_row(&back), at[&step].0, "step {step}: the rows as that step left them");
            assert_eq!(status(&back), at[&step].1, "step {step}: counters, version, learning rate");
        }
        let ck = Checkpoint::load(&dir.0.join("step-4")).unwrap();
        let joined: Manifest = serde_json::from_slice(&std::fs::read(dir.0.join("step-4/manifest.json")).unwrap()).unwrap();
        assert_eq!((joined.tables.len(), joined.tables[0].rows, joined.tables[0].version), (1, at[&4].1.rows, 4));
        let mut listing = Vec::new();
        tool::inspect(&ck, &mut listing).unwrap();
        let listing = String::from_utf8(listing).unwrap();
        assert!(listing.contains("tables (1):") && listing.contains("emb  dim 3 f32  adagrad") && listing.contains("version 4"), "{listing}");

        // Restored into another store: the table as it was, found by its registration, and
        // the next step gives the same bits as on the original.
        let restored = VariableStore::new(StoreConfig::new(mode), Arc::new(Metrics::default()));
        assert_eq!(restore_into(&restored, Arc::new(ck), 0, 1).unwrap(), 1);
        assert!(!restored.tables().register(table_def(DType::F32)).unwrap(), "found, not created");
        let back = restored.tables().get("emb").unwrap();
        assert_eq!((every_row(&back), status(&back)), at[&4]);
        for w in 0..2 {
            table_push(&t, w, 4);
            table_push(&back, w, 4);
        }
        assert_eq!(every_row(&back), every_row(&t));
        assert_eq!(status(&back), status(&t));
    }

    #[test]
    fn a_sync_checkpoint_whose_table_passed_its_step_untaken_is_skipped() {
        let dir = TempDir::new("sync-skip");
        let mode = Mode::Sync { num_workers: 1, replicas_to_aggregate: 1 };
        let (store, c) = store_with_checkpoints(mode, &dir.0, 2);
        let t = store.tables().get("emb").unwrap();
        // The table completes four steps before any variable is pushed.
        for step in 0..4 {
            table_push(&t, 0, step);
        }
        let at4 = (every_row(&t), status(&t));
        for step in 0..4 {
            dense_push(&store, 0, step);
        }
        c.finish();
        assert!(!dir.0.join("step-2/shard-0-of-1.json").exists(), "step 2 could not hold the table as it left it");
        let ck = Checkpoint::load(&dir.0.join("step-4")).unwrap();
        let back = table_of(&ck, mode);
        assert_eq!((every_row(&back), status(&back)), at4, "the table at step 4 when the variable got there");
    }

    #[test]
    fn async_checkpoints_hold_each_table_as_it_is_with_its_version() {
        let dir = TempDir::new("async-tables");
        let mode = Mode::Async { num_workers: 1, lr_div_staleness: false };
        let (store, c) = store_with_checkpoints(mode, &dir.0, 2);
        let t = store.tables().get("emb").unwrap();
        for step in 0..5 {
            table_push(&t, 0, step);
        }
        dense_push(&store, 0, 0);
        dense_push(&store, 0, 1);
        let now = (every_row(&t), status(&t));
        dense_push(&store, 0, 2); // the first push of step 2 takes checkpoint 2 first
        table_push(&t, 0, 5);
        c.finish();
        let ck = Checkpoint::load(&dir.0.join("step-2")).unwrap();
        assert_eq!(ck.shards[0].tables[0].version, 5);
        let back = table_of(&ck, mode);
        assert_eq!((every_row(&back), status(&back)), now);
    }

    /// A store of the tables `emb` (f32) and `emb2` (bf16) and no variable, writing
    /// checkpoints every `every` steps and, with `timed`, about that often.
    fn tables_only(mode: Mode, dir: &Path, every: u64, timed: Option<Duration>) -> (Arc<VariableStore>, Arc<Checkpointer>, [Arc<SparseTable>; 2]) {
        let metrics = Arc::new(Metrics::default());
        let store = Arc::new(VariableStore::new(StoreConfig::new(mode), Arc::clone(&metrics)));
        store.tables().register(table_def(DType::F32)).unwrap();
        store.tables().register(TableDef { name: "emb2".into(), ..table_def(DType::Bf16) }).unwrap();
        let c = Checkpointer::start(CheckpointSettings { every: timed, ..settings(dir, every, 0, 1) }, mode, 0, metrics).unwrap();
        store.set_checkpointer(Arc::clone(&c));
        let tables = [store.tables().get("emb").unwrap(), store.tables().get("emb2").unwrap()];
        (store, c, tables)
    }

    /// Both tables' rows and status.
    type TablesAt = Vec<(Vec<u32>, crate::sparse::TableStatus)>;

    fn tables_at(tables: &[Arc<SparseTable>]) -> TablesAt {
        tables.iter().map(|t| (every_row(t), status(t))).collect()
    }

    /// The tables of checkpoint `step` in `dir`, restored, as [`tables_at`] sees them
    /// (checking the checkpoint holds no variable).
    fn checkpointed(dir: &Path, step: u64, mode: Mode) -> TablesAt {
        let ck = Checkpoint::load(&dir.join(format!("step-{step}"))).unwrap_or_else(|e| panic!("checkpoint {step}: {e:#}"));
        assert!(ck.shards[0].variables.is_empty());
        let (vars, tables) = ck.read_shard_all(0).unwrap();
        assert!(vars.is_empty());
        let names: Vec<&str> = tables.iter().map(|t| t.def.name.as_str()).collect();
        assert_eq!(names, ["emb", "emb2"], "step {step}: every table");
        let back: Vec<Arc<SparseTable>> = tables.into_iter().map(|t| Arc::new(SparseTable::restored(t, mode).unwrap())).collect();
        tables_at(&back)
    }

    #[test]
    fn a_sync_shard_of_tables_alone_writes_every_n_steps_each_table_as_the_step_left_it() {
        let dir = TempDir::new("sync-tables-only");
        let mode = Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 };
        let (_store, c, [a, b]) = tables_only(mode, &dir.0, 2, None);
        // `emb` runs four steps ahead; `emb2`, with one worker's push of step 0 in, completes
        // steps 2 and 4 later.
        table_push(&b, 0, 0);
        let (mut at_a, mut at_b) = (BTreeMap::new(), BTreeMap::new());
        for step in 0..4 {
            for w in 0..2 {
                table_push(&a, w, step);
            }
            at_a.insert(step + 1, (every_row(&a), status(&a)));
        }
        {
            let pending = c.pending.lock();
            assert_eq!(pending.keys().copied().collect::<Vec<_>>(), [2, 4], "taken as `emb` completed them, waiting for `emb2`");
            assert!(pending.values().all(|p| p.tables.len() == 1 && p.expected_tables.is_some()));
        }
        for step in 0..4 {
            for w in 0..2 {
                if (step, w) != (0, 0) {
                    table_push(&b, w, step);
                }
            }
            at_b.insert(step + 1, (every_row(&b), status(&b)));
        }
        c.finish();
        for step in [2u64, 4] {
            assert_eq!(checkpointed(&dir.0, step, mode), vec![at_a[&step].clone(), at_b[&step].clone()], "step {step}: each table as it left it");
            let joined: Manifest = serde_json::from_slice(&std::fs::read(dir.0.join(format!("step-{step}/manifest.json"))).unwrap()).unwrap();
            assert_eq!(joined.tables.iter().map(|t| (t.name.as_str(), t.version)).collect::<Vec<_>>(), [("emb", step), ("emb2", step)]);
        }
        assert!(!dir.0.join("step-1").exists() && !dir.0.join("step-3").exists());
        assert!(c.pending.lock().is_empty(), "nothing left waiting");
    }

    #[test]
    fn a_table_never_pushed_does_not_hold_sync_checkpoints_open() {
        let dir = TempDir::new("sync-never-pushed");
        let mode = Mode::Sync { num_workers: 1, replicas_to_aggregate: 1 };
        // A shard of tables alone, `emb2` registered and never pushed.
        let (_store, c, [a, b]) = tables_only(mode, &dir.0, 2, None);
        for step in 0..20 {
            table_push(&a, 0, step);
            let pending = c.pending.lock();
            assert!(pending.len() <= 1, "step {step}: checkpoints waiting {:?}", pending.keys().collect::<Vec<_>>());
        }
        assert_eq!(c.pending.lock().keys().copied().collect::<Vec<_>>(), [20], "only the newest waits");
        assert!(!b.pushed() && a.pushed());
        // Beside a variable alike: each checkpoint step with every variable in drops the earlier ones.
        let dir = TempDir::new("sync-never-pushed-dense");
        let (store, c) = store_with_checkpoints(mode, &dir.0, 2);
        store.tables().register(TableDef { name: "idle".into(), ..table_def(DType::F32) }).unwrap();
        let t = store.tables().get("emb").unwrap();
        for step in 0..20 {
            dense_push(&store, 0, step);
            table_push(&t, 0, step);
            assert!(c.pending.lock().len() <= 1, "step {step}");
        }
        c.finish();
        assert!(!dir.0.join("step-2").exists());
    }

    /// A hook between the tables and the checkpointer that, as a table hands over its state
    /// at step 2, has another thread complete the table's next step and the variable's step
    /// 2 (waiting for it up to a second) before passing the state on: the order a preempted
    /// thread could see.
    struct Racing {
        inner: StepHook,
        store: Arc<VariableStore>,
        other: Mutex<Option<std::thread::JoinHandle<()>>>,
    }

    impl TableStepHook for Racing {
        fn wants_step(&self, step: u64) -> bool {
            self.inner.wants_step(step)
        }

        fn table_captured(&self, capture: TableCapture) {
            if capture.version == 2 {
                let store = Arc::clone(&self.store);
                let (tx, rx) = std::sync::mpsc::channel();
                let other = std::thread::spawn(move || {
                    table_push(&store.tables().get("emb").unwrap(), 0, 2);
                    dense_push(&store, 0, 1);
                    let _ = tx.send(());
                });
                let _ = rx.recv_timeout(Duration::from_secs(1));
                *self.other.lock() = Some(other);
            }
            self.inner.table_captured(capture);
        }

        fn after_capture(&self, step: u64) {
            self.inner.after_capture(step);
        }
    }

    #[test]
    fn a_table_that_completes_the_next_step_at_once_is_still_in_the_sync_checkpoint() {
        let dir = TempDir::new("sync-race");
        let mode = Mode::Sync { num_workers: 1, replicas_to_aggregate: 1 };
        let (store, c) = store_and_checkpointer(mode, &dir.0, 2);
        let racing = Arc::new(Racing { inner: StepHook(Arc::downgrade(&c)), store: Arc::clone(&store), other: Mutex::new(None) });
        assert!(store.tables().set_step_hook(racing.clone()));
        store.set_checkpointer(Arc::clone(&c));
        let t = store.tables().get("emb").unwrap();
        dense_push(&store, 0, 0);
        table_push(&t, 0, 0);
        let at2 = {
            let reference = SparseTable::new(table_def(DType::F32), mode);
            table_push(&reference, 0, 0);
            table_push(&reference, 0, 1);
            (every_row(&reference), status(&reference))
        };
        table_push(&t, 0, 1); // completes step 2: the other thread pushes step 2 of `emb` and step 1 of `w`
        racing.other.lock().take().expect("the other thread ran").join().unwrap();
        assert_eq!(status(&t).version, 3);
        c.finish();
        let ck = Checkpoint::load(&dir.0.join("step-2")).expect("checkpoint 2 written");
        assert_eq!(ck.shards[0].tables[0].version, 2);
        let back = table_of(&ck, mode);
        assert_eq!((every_row(&back), status(&back)), at2, "the table as step 2 left it");
    }

    #[test]
    fn an_async_shard_of_tables_alone_takes_its_tables_at_the_first_push_of_a_checkpoint_step() {
        for mode in [Mode::Async { num_workers: 1, lr_div_staleness: false }, Mode::Bounded { num_workers: 1, max_staleness: 2, lr_div_staleness: false }] {
            let dir = TempDir::new(&format!("{}-tables-only", mode.name()));
            let (store, c, tables) = tables_only(mode, &dir.0, 2, None);
            let mut at = BTreeMap::new();
            for step in 0..5 {
                let before = tables_at(&tables);
                for t in &tables {
                    // As a push of rows arrives at the shard: the checkpointer first.
                    c.before_table_push(&store, step);
                    table_push(t, 0, step);
                }
                at.insert(step, before);
            }
            c.finish();
            for step in [2u64, 4] {
                assert_eq!(checkpointed(&dir.0, step, mode), at[&step], "{mode:?}: step {step} as its first push found the tables");
            }
            assert!(!dir.0.join("step-1").exists() && !dir.0.join("step-3").exists());
        }
    }

    #[test]
    fn a_checkpoint_asked_of_a_shard_of_tables_alone_holds_its_tables_at_that_step() {
        let dir = TempDir::new("asked-tables-only");
        let mode = Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 };
        let (store, c, tables) = tables_only(mode, &dir.0, 0, None);
        let step = |s: u64| {
            for t in &tables {
                for w in 0..2 {
                    table_push(t, w, s);
                }
            }
        };
        step(0);
        // Asked ahead of the tables: written as they complete it. At their step: at once.
        let ahead = c.request(&store, 3);
        let now = c.request(&store, 1);
        let at1 = tables_at(&tables);
        step(1);
        step(2);
        let at3 = tables_at(&tables);
        step(3);
        let o = now.blocking_recv().unwrap().unwrap();
        assert_eq!((o.step, o.complete), (1, true));
        let o = ahead.blocking_recv().unwrap().unwrap();
        assert_eq!((o.step, o.complete), (3, true));
        // A step the tables have passed cannot be held as it left them.
        let err = c.request(&store, 2).blocking_recv().unwrap().unwrap_err();
        assert!(err.contains("table emb has completed step 4 already, past step 2"), "{err}");
        c.finish();
        assert_eq!(checkpointed(&dir.0, 1, mode), at1);
        assert_eq!(checkpointed(&dir.0, 3, mode), at3);
        assert!(!dir.0.join("step-2").join("shard-0-of-1.json").exists());

        // Async: the tables as they are now.
        let dir = TempDir::new("asked-tables-only-async");
        let mode = Mode::Async { num_workers: 1, lr_div_staleness: false };
        let (store, c, tables) = tables_only(mode, &dir.0, 0, None);
        tables.iter().for_each(|t| table_push(t, 0, 0));
        let now = tables_at(&tables);
        let o = c.request(&store, 7).blocking_recv().unwrap().unwrap();
        assert_eq!(o.step, 7);
        c.finish();
        assert_eq!(checkpointed(&dir.0, 7, mode), now);
    }

    #[test]
    fn time_based_checkpoints_of_a_shard_of_tables_alone_are_named_and_taken() {
        // Sync: due at once, it names two steps past the newest push; a push passing that
        // step on takes every table as the step leaves it.
        let dir = TempDir::new("timed-tables-only");
        let mode = Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 };
        let (store, c, tables) = tables_only(mode, &dir.0, 0, Some(Duration::ZERO));
        let mut named = 0;
        let mut at = BTreeMap::new();
        for s in 0..4u64 {
            for w in 0..2 {
                for t in &tables {
                    if named > 0 {
                        c.passed_on(&store, named);
                    }
                    table_push(t, w, s);
                    let due = c.on_push(s);
                    if s == 0 && named == 0 {
                        assert_eq!(due, 2, "two steps past the newest");
                        named = due;
                    }
                }
            }
            at.insert(s + 1, tables_at(&tables));
        }
        c.finish();
        assert_eq!(checkpointed(&dir.0, 2, mode), at[&2]);

        // Async: taken at once, before the push that passes it on.
        let dir = TempDir::new("timed-tables-only-async");
        let mode = Mode::Async { num_workers: 1, lr_div_staleness: false };
        let (store, c, tables) = tables_only(mode, &dir.0, 0, Some(Duration::ZERO));
        tables.iter().for_each(|t| table_push(t, 0, 0));
        assert_eq!(c.on_push(0), 1, "one step past the newest");
        let now = tables_at(&tables);
        c.passed_on(&store, 1);
        tables.iter().for_each(|t| table_push(t, 0, 1));
        c.finish();
        assert_eq!(checkpointed(&dir.0, 1, mode), now);
    }

    /// A table's rows on shard `shard` of `shards` after a few steps (ids routed as clients route them).
    fn shard_table(dtype: DType, shard: usize, shards: usize) -> SparseTable {
        let t = SparseTable::new(table_def(dtype), Mode::Async { num_workers: 1, lr_div_staleness: false });
        for step in 0..12u64 {
            let ids: Vec<u64> = (0..9u64)
                .map(|i| (step * 5 + i * 3) % 31)
                .filter(|&id| parasync_proto::sparse::shard_of_id(id, shards) == shard)
                .collect();
            let rows: Vec<f32> = (0..ids.len() * 3).map(|i| ((i + step as usize) as f32 * 0.31).cos()).collect();
            let base_version = t.status().version;
            t.push(PushMeta { worker: 0, step, base_version }, SparseGrad::summed(&ids, &rows, 3)).unwrap();
        }
        t
    }

    #[test]
    fn tables_restore_onto_other_shard_counts_by_routing_their_rows() {
        for dtype in [DType::F32, DType::Bf16] {
            let dir = TempDir::new(&format!("routed-{}", dtype.name()));
            let old: Vec<SparseTable> = (0..2).map(|s| shard_table(dtype, s, 2)).collect();
            for (s, t) in old.iter().enumerate() {
                write_shard(&settings(&dir.0, 0, s as u32, 2), "async", 7, &[], vec![t.capture()]).unwrap();
            }
            let ck = Checkpoint::load(&dir.0.join("step-7")).unwrap();
            let ids: Vec<u64> = (0..31).collect();
            let rows_of = |t: &SparseTable, id: u64| {
                let mut out = [0f32; 3];
                t.lookup(&[id], &mut out);
                out.map(f32::to_bits)
            };
            let total = |f: &dyn Fn(&crate::sparse::TableStatus) -> u64, ts: &[SparseTable]| ts.iter().map(|t| f(&t.status())).sum::<u64>();
            for shards in [1u32, 3] {
                let new: Vec<SparseTable> = (0..shards)
                    .map(|s| {
                        let mut tables = ck.read_tables_routed(s, shards).unwrap();
                        assert_eq!(tables.len(), 1);
                        let r: RestoredTable = tables.remove(0);
                        assert!(r.rows.ids.iter().all(|&id| parasync_proto::sparse::shard_of_id(id, shards as usize) == s as usize));
                        SparseTable::restored(r, Mode::Async { num_workers: 1, lr_div_staleness: false }).unwrap()
                    })
                    .collect();
                // Onto one shard the rows of two exceed its capacity: the least recently
                // used go (on three, every row stays).
                let trimmed = total(&|s| s.rows, &old).saturating_sub(10 * shards as u64);
                assert_eq!(trimmed > 0, shards == 1, "{dtype:?}: {} rows", total(&|s| s.rows, &old));
                for &id in &ids {
                    let was = &old[parasync_proto::sparse::shard_of_id(id, 2)];
                    let now = &new[parasync_proto::sparse::shard_of_id(id, shards as usize)];
                    if now.contains(id) || trimmed == 0 {
                        assert_eq!(rows_of(now, id), rows_of(was, id), "{dtype:?}, {shards} shards: id {id}");
                        assert_eq!(now.contains(id), was.contains(id));
                    }
                }
                assert_eq!(total(&|s| s.rows, &new), total(&|s| s.rows, &old) - trimmed);
                assert_eq!(total(&|s| s.counts.evicted, &new), total(&|s| s.counts.evicted, &old) + trimmed);
                assert_eq!(total(&|s| s.counts.admitted, &new), total(&|s| s.counts.admitted, &old), "counter sums stay");
                assert_eq!(total(&|s| s.counts.dropped, &new), total(&|s| s.counts.dropped, &old));
                assert_eq!(new[0].status().version, old.iter().map(|t| t.status().version).max().unwrap());
            }
            // Export joins the table's rows from every shard.
            let out = dir.0.join("export.safetensors");
            tool::export(&ck, &out, true).unwrap();
            let r = safetensors::Reader::open(&out).unwrap();
            let n = old.iter().map(|t| t.status().rows).sum::<u64>();
            assert_eq!(r.info("table:emb:ids").unwrap().shape, vec![n]);
            assert_eq!(r.info("table:emb:accumulator").unwrap().shape, vec![n, 3]);
        }
    }

    #[test]
    fn restored_tables_reserve_their_capacity_from_the_shard_limit() {
        let mode = Mode::Async { num_workers: 1, lr_div_staleness: false };
        // Capacity 10 rows of 3 f32 values and an Adagrad slot: 240 bytes.
        let def = table_def(DType::F32);
        assert_eq!(def.capacity * def.row_bytes(), 240);
        let original = SparseTable::new(def.clone(), mode);
        table_push(&original, 0, 0);
        table_push(&original, 0, 1);
        let restored = |name: &str| {
            let c = original.capture();
            let (rows, stripes) = c.packed();
            RestoredTable { def: TableDef { name: name.into(), ..c.def.clone() }, version: c.version, worker_clocks: c.worker_clocks.clone(), learning_rate: c.learning_rate, rows, stripes }
        };
        let mut config = StoreConfig::new(mode);
        config.max_shard_bytes = 500;
        let store = VariableStore::new(config, Arc::new(Metrics::default()));
        insert_tables(&store, vec![restored("emb"), restored("emb2")]).unwrap();
        assert_eq!(store.held_bytes(), 480, "both capacities reserved");
        // The registration of the same table finds it and reserves nothing more.
        assert!(!store.register_table(TableDef { name: "emb".into(), ..def.clone() }).unwrap());
        assert_eq!(store.held_bytes(), 480);
        let e = insert_tables(&store, vec![restored("emb3")]).unwrap_err().to_string();
        assert!(e.contains("emb3") && e.contains("needs 240 bytes") && e.contains("holds 480 of its --max-shard-bytes 500"), "{e}");
        assert!(store.tables().get("emb3").is_err());
        assert_eq!(store.held_bytes(), 480, "the refused one holds nothing");
        // A table restored twice gives its second reservation back.
        assert!(insert_tables(&store, vec![restored("emb")]).is_err());
        assert_eq!(store.held_bytes(), 480);
        let e = store.register_table(TableDef { name: "new".into(), ..def }).unwrap_err();
        assert!(matches!(e, crate::error::Error::ResourceExhausted { .. }), "{e}");
    }

    #[test]
    fn manifests_without_tables_still_load() {
        let json = r#"{"format":"parasync-checkpoint/1","step":3,"mode":"sync","shard":0,"num_shards":1,
            "file":"shard-0-of-1.safetensors","bytes":8,"crc32":"00000000","written_unix_ms":0,"variables":[]}"#;
        let m: ShardManifest = serde_json::from_str(json).unwrap();
        assert!(m.tables.is_empty());
        assert!(!serde_json::to_string(&m).unwrap().contains("tables"), "none written when there are none");
        let joined = r#"{"format":"parasync-checkpoint/1","step":3,"mode":"sync","num_shards":1,"files":[],"variables":[]}"#;
        assert!(serde_json::from_str::<Manifest>(joined).unwrap().tables.is_empty());
        // A table's entry round-trips, definition included.
        let mut def = table_def(DType::Bf16);
        def.init = RowInit::Normal { mean: 0.1, stddev: 0.02, seed: u64::MAX };
        def.optimizer = RowOptimizer::Ftrl { lr: 0.3, initial_accumulator: 0.1, l1: 0.01, l2: 0.001, beta: 1.0 };
        def.admission = Admission::Probability { p: 0.25, seed: 3 };
        def.eviction = Eviction::Ttl { steps: 5 };
        let e = TableEntry::of_def(&def);
        let back: TableEntry = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back.def().unwrap(), def);
    }
}
