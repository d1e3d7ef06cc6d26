//! Checkpoints of a shard: when they are taken, how they are written, and restore.
//!
//! A checkpoint is a folder `DIR/step-<n>/` holding, per shard, `shard-<i>-of-<S>.safetensors`
//! (each variable's values under its name, each optimizer slot as `<name>:<slot>`) and
//! `shard-<i>-of-<S>.json`, its manifest (definitions, versions, learning rates, update
//! counts, the file's size and CRC-32). Once every shard's manifest is there, `manifest.json`
//! joins them: whole variables and the row ranges of their parts.
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
//! pushes of the steps up to it (`checkpoint_step`), which reach every shard. In sync mode
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
use crate::store::{VariableCapture, VariableStore};
use manifest::{FileEntry, Manifest, OptimizerEntry, PartEntry, ShardManifest, VariableEntry, WholeVariable, FORMAT};
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
    waiters: Vec<Waiter>,
}

struct Job {
    step: u64,
    captures: Vec<VariableCapture>,
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
        let c = Arc::new(Checkpointer {
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
                let result = write_shard(&settings, mode_name, job.step, &job.captures).map_err(|e| format!("{e:#}"));
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

    /// Sync mode: a variable's state as of the step it just completed.
    pub fn captured(&self, store: &VariableStore, capture: VariableCapture) {
        let step = capture.version;
        let mut pending = self.pending.lock();
        pending.entry(step).or_default().captures.insert(capture.def.name.clone(), capture);
        self.pending_count.store(pending.len(), Ordering::Release);
        self.complete_if_ready(store, &mut pending, step);
    }

    /// Hands step `step` to the writer once every variable of the store is in it.
    fn complete_if_ready(&self, store: &VariableStore, pending: &mut BTreeMap<u64, Pending>, step: u64) {
        let Some(p) = pending.get(&step) else { return };
        // Counted first: listing the variables for every one taken would be quadratic.
        if p.captures.len() < store.len() || !store.list().iter().all(|v| p.captures.contains_key(&v.def().name)) {
            return;
        }
        let p = pending.remove(&step).expect("present");
        self.pending_count.store(pending.len(), Ordering::Release);
        let mut captures: Vec<VariableCapture> = p.captures.into_values().collect();
        captures.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        self.send(Job { step, captures, waiters: p.waiters });
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

    /// Async / bounded mode: a push of a worker's `step` is about to be applied; the first
    /// one of a checkpoint step takes every variable's state first.
    pub fn before_push(&self, store: &VariableStore, step: u64) {
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
            self.send(Job { step: at, captures: store.capture_all(), waiters: Vec::new() });
            self.next_async.store(at + every, Ordering::Release);
        }
    }

    /// A checkpoint of `step` asked for by a client. Sync: every variable as `step` leaves
    /// it (now, for those already there; as the others get there); a variable already past
    /// `step` fails the request. Async / bounded: every variable as it is now, named `step`.
    pub fn request(&self, store: &VariableStore, step: u64) -> oneshot::Receiver<Result<Outcome, String>> {
        let (tx, rx) = oneshot::channel();
        if !matches!(self.mode, Mode::Sync { .. }) {
            self.send(Job { step, captures: store.capture_all(), waiters: vec![tx] });
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
                    if let Some(p) = pending.remove(&step) {
                        fail(p.waiters, &why);
                    }
                    self.pending_count.store(pending.len(), Ordering::Release);
                    return Err(why);
                }
            }
        }
        let mut pending = self.pending.lock();
        self.complete_if_ready(store, &mut pending, step);
        Ok(())
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
            self.send(Job { step, captures: store.capture_all(), waiters: Vec::new() });
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

fn dtype_str(dtype: parasync_tensor::DType) -> &'static str {
    match dtype {
        parasync_tensor::DType::F32 => "f32",
        parasync_tensor::DType::Bf16 => "bf16",
    }
}

/// Writes one shard's part of checkpoint `step`: data file, then manifest, each under a
/// temporary name, fsynced and renamed; then the folder is fsynced.
pub fn write_shard(settings: &CheckpointSettings, mode: &str, step: u64, captures: &[VariableCapture]) -> anyhow::Result<Outcome> {
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
        tensors.push(safetensors::TensorOut { name: c.def.name.clone(), dtype: c.def.dtype, shape: c.def.shape.clone(), data: c.values_le_bytes() });
        for (_, key, data) in slots {
            tensors.push(safetensors::TensorOut { name: key.clone(), dtype: parasync_tensor::DType::F32, shape: c.def.shape.clone(), data });
        }
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
    };
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
    Manifest { format: FORMAT.into(), step: first.step, mode: first.mode.clone(), num_shards: first.num_shards, files, variables }
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
        let vars = checkpoint.read_shard(shard)?;
        let n = vars.len();
        for (def, restored) in vars {
            let name = def.name.clone();
            store.insert_restored(def, restored).map_err(|e| anyhow::anyhow!("restoring {name}: {e}"))?;
        }
        Ok(n)
    } else {
        if let Some(s) = checkpoint.deferred {
            checkpoint.verify(s)?;
        }
        store.set_restore_source(checkpoint);
        Ok(0)
    }
}

/// How long a client's checkpoint request may wait for the variables to reach its step.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
