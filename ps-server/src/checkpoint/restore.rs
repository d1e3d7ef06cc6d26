//! Finding, checking and reading checkpoints: the newest complete one whose checksums
//! match, and any variable (or part of one, on another shard count) cut from its files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use parasync_tensor::DType;
use parking_lot::Mutex;

use super::manifest::{split_part_name, ShardManifest, TableEntry, VariableEntry, FORMAT};
use super::safetensors::{file_crc32, Dtype, Reader};
use crate::error::{Error, Result};
use crate::optimizer::OptimizerSnapshot;
use crate::sparse::{PackedRows, RestoredTable, RowState, RowValues, StripeState, TableDef};
use crate::store::{RestoreSource, RestoredVariable, Values, VariableDef};

/// A complete checkpoint: every shard's manifest, each file's checksum verified.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub step: u64,
    pub num_shards: u32,
    pub mode: String,
    /// Indexed by shard.
    pub shards: Vec<ShardManifest>,
    /// The shard whose file's checksum is still to be checked (see [`Checkpoint::load_deferring`]).
    pub deferred: Option<u32>,
    readers: Mutex<BTreeMap<u32, std::sync::Arc<Reader>>>,
}

/// The step of a checkpoint folder's name (`step-<n>`).
pub fn step_of(name: &str) -> Option<u64> {
    let n = name.strip_prefix("step-")?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| n.parse().ok()).flatten()
}

/// The checkpoint folders under `root`, newest first.
pub fn step_dirs(root: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let mut dirs = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(dirs),
        Err(e) => return Err(e).with_context(|| format!("listing {}", root.display())),
    };
    for e in entries {
        let e = e?;
        if let Some(step) = e.file_name().to_str().and_then(step_of) {
            if e.file_type()?.is_dir() {
                dirs.push((step, e.path()));
            }
        }
    }
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(dirs)
}

impl Checkpoint {
    /// Loads the checkpoint in folder `dir` (`…/step-<n>`): every shard's manifest is there
    /// and agrees, and every file has the size and checksum its manifest says.
    pub fn load(dir: &Path) -> anyhow::Result<Checkpoint> {
        Self::load_deferring(dir, None)
    }

    /// [`load`](Self::load), leaving the checksum of shard `defer`'s file to be checked as it
    /// is read (see [`read_shard`](Self::read_shard), [`verify`](Self::verify)).
    pub fn load_deferring(dir: &Path, defer: Option<u32>) -> anyhow::Result<Checkpoint> {
        let mut manifests: BTreeMap<u32, ShardManifest> = BTreeMap::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let name = e?.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with("shard-") && name.ends_with(".json")) {
                continue;
            }
            let path = dir.join(name);
            let m: ShardManifest = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("{} is not a shard manifest", path.display()))?;
            ensure!(m.format == FORMAT, "{}: format {:?}, expected {FORMAT:?}", path.display(), m.format);
            manifests.insert(m.shard, m);
        }
        let first = manifests.values().next().with_context(|| format!("{}: incomplete, no shard manifest in it", dir.display()))?;
        let (step, num_shards, mode) = (first.step, first.num_shards, first.mode.clone());
        for m in manifests.values() {
            ensure!(
                m.step == step && m.num_shards == num_shards,
                "{}: shard {} says step {} of {} shards, shard {} step {step} of {num_shards}",
                dir.display(),
                m.shard,
                m.step,
                m.num_shards,
                first.shard
            );
        }
        let missing: Vec<u32> = (0..num_shards).filter(|s| !manifests.contains_key(s)).collect();
        ensure!(missing.is_empty(), "{}: incomplete, no manifest of shard(s) {missing:?} of {num_shards}", dir.display());
        ensure!(manifests.len() == num_shards as usize, "{}: manifests of shards beyond {num_shards}", dir.display());
        for m in manifests.values() {
            ensure!(!m.file.contains('/') && !m.file.starts_with('.'), "{}: file name {:?}", dir.display(), m.file);
            let path = dir.join(&m.file);
            if Some(m.shard) == defer {
                let size = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?.len();
                ensure!(size == m.bytes, "{}: {size} bytes, the manifest says {}", path.display(), m.bytes);
            } else {
                check_file(&path, m, file_crc32(&path)?)?;
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            step,
            num_shards,
            mode,
            shards: manifests.into_values().collect(),
            deferred: defer.filter(|d| *d < num_shards),
            readers: Mutex::new(BTreeMap::new()),
        })
    }

    /// Checks the checksum of shard `shard`'s file (one [`load_deferring`](Self::load_deferring) left).
    pub fn verify(&self, shard: u32) -> anyhow::Result<()> {
        let m = self.shards.get(shard as usize).with_context(|| format!("no shard {shard}"))?;
        let path = self.dir.join(&m.file);
        check_file(&path, m, file_crc32(&path)?)
    }

    /// Every variable of shard `shard`'s file, read in one pass front to back that also
    /// checks the file's checksum (nothing is returned from a file that fails it).
    pub fn read_shard(&self, shard: u32) -> anyhow::Result<Vec<(VariableDef, RestoredVariable)>> {
        Ok(self.read_shard_all(shard)?.0)
    }

    /// Every variable and sparse table of shard `shard`'s file, read in one pass front to
    /// back that also checks the file's checksum (nothing is returned from a file that fails it).
    #[allow(clippy::type_complexity)]
    pub fn read_shard_all(&self, shard: u32) -> anyhow::Result<(Vec<(VariableDef, RestoredVariable)>, Vec<RestoredTable>)> {
        let m = self.shards.get(shard as usize).with_context(|| format!("no shard {shard}"))?;
        let path = self.dir.join(&m.file);
        let reader = Reader::open(&path)?;
        let mut vars = Vec::with_capacity(m.variables.len());
        for v in &m.variables {
            let def = v.def()?;
            let n = usize::try_from(v.shape.iter().product::<u64>())?;
            let values = match def.dtype {
                DType::F32 => Values::F32(vec![0.0; n]),
                DType::Bf16 => Values::Bf16(vec![0; n]),
            };
            let names = def.optimizer.slot_names();
            let slots: Vec<Vec<f32>> = names.iter().map(|_| vec![0.0; n]).collect();
            for s in names {
                ensure!(v.slots.contains_key(*s), "{}: {} has no slot {s}", path.display(), v.name);
            }
            vars.push((def, values, slots, v));
        }
        let mut into: Vec<(&str, &mut [u8])> = Vec::new();
        for (def, values, slots, v) in &mut vars {
            into.push((
                v.tensor.as_str(),
                match values {
                    Values::F32(x) => parasync_tensor::f32_as_le_bytes_mut(x),
                    Values::Bf16(x) => parasync_tensor::u16_as_le_bytes_mut(x),
                },
            ));
            for (name, slot) in def.optimizer.slot_names().iter().zip(slots.iter_mut()) {
                into.push((v.slots[*name].as_str(), parasync_tensor::f32_as_le_bytes_mut(slot)));
            }
        }
        let mut tables = m.tables.iter().map(|t| TableBuffers::new(&reader, t)).collect::<anyhow::Result<Vec<_>>>()?;
        for t in &mut tables {
            into.extend(t.targets());
        }
        let got = reader.read_all_into(into)?;
        check_file(&path, m, got)?;
        let tables = tables.into_iter().map(TableBuffers::finish).collect::<anyhow::Result<Vec<_>>>()?;
        let vars = vars
            .into_iter()
            .map(|(def, values, slots, v)| {
                let optimizer = OptimizerSnapshot { lr: v.learning_rate, updates: v.updates, slots: slots.into_iter().map(std::sync::Arc::new).collect() };
                let last_pushes = v.last_pushes.iter().map(|p| p.get()).collect();
                (def, RestoredVariable { version: v.version, values, optimizer, worker_clocks: v.worker_clocks.clone(), last_pushes })
            })
            .collect();
        Ok((vars, tables))
    }

    /// Every sparse table of the checkpoint as shard `shard` of `num_shards` holds it: from
    /// every old shard file, the rows and admission counters whose ids route to this shard
    /// (`parasync_proto::sparse::shard_of_id`). The version is the highest of the old shards',
    /// the bounded clocks each the highest, the learning rate the first shard's; the counters
    /// of old shard `j` go to new shard `j % num_shards` (so their sums over the job stay), and
    /// every stripe starts at the highest tick and last sweep of the old ones. Reads whole
    /// tables from every file (one at a time): the files' checksums must have been checked.
    pub fn read_tables_routed(&self, shard: u32, num_shards: u32) -> anyhow::Result<Vec<RestoredTable>> {
        let mut out: BTreeMap<String, RestoredTable> = BTreeMap::new();
        for m in &self.shards {
            if m.tables.is_empty() {
                continue;
            }
            let reader = self.reader(m.shard)?;
            for entry in &m.tables {
                let mut b = TableBuffers::new(&reader, entry)?;
                for (name, buf) in b.targets() {
                    let n = reader.info(name)?.elements();
                    reader.read_elements(name, 0..n, buf)?;
                }
                let full = b.finish()?;
                let mut mine = vec![PackedRows::empty(full.rows.dim, full.def.dtype, full.def.optimizer.num_slots())];
                full.rows.route_into(&mut mine, |id| {
                    (parasync_proto::sparse::shard_of_id(id, num_shards as usize) == shard as usize).then_some(0)
                });
                let mine = mine.pop().expect("one");
                let mut folded = StripeState::default();
                for s in &full.stripes {
                    folded.tick = folded.tick.max(s.tick);
                    folded.swept_at = folded.swept_at.max(s.swept_at);
                    if m.shard % num_shards == shard {
                        let (a, c) = (&mut folded.counts, &s.counts);
                        a.admitted += c.admitted;
                        a.evicted += c.evicted;
                        a.dropped += c.dropped;
                        a.updated += c.updated;
                        a.admission_resets += c.admission_resets;
                    }
                }
                match out.entry(entry.name.clone()) {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(RestoredTable { rows: mine, stripes: vec![folded], ..full });
                    }
                    std::collections::btree_map::Entry::Occupied(mut e) => {
                        let t = e.get_mut();
                        let diff = t.def.differences(&full.def);
                        ensure!(diff.is_empty(), "{}: the shard files hold table {} otherwise: {}", self.dir.display(), entry.name, diff.join("; "));
                        t.version = t.version.max(full.version);
                        if t.worker_clocks.len() < full.worker_clocks.len() {
                            t.worker_clocks.resize(full.worker_clocks.len(), 0);
                        }
                        for (c, &p) in t.worker_clocks.iter_mut().zip(&full.worker_clocks) {
                            *c = (*c).max(p);
                        }
                        mine.route_into(std::slice::from_mut(&mut t.rows), |_| Some(0));
                        let s = &mut t.stripes[0];
                        s.tick = s.tick.max(folded.tick);
                        s.swept_at = s.swept_at.max(folded.swept_at);
                        let (a, c) = (&mut s.counts, &folded.counts);
                        a.admitted += c.admitted;
                        a.evicted += c.evicted;
                        a.dropped += c.dropped;
                        a.updated += c.updated;
                        a.admission_resets += c.admission_resets;
                    }
                }
            }
        }
        Ok(out.into_values().collect())
    }


    /// The checkpoint folders `what` names, newest first: `latest` → those under `root`; a
    /// `step-<n>` folder → itself; another folder → those under it.
    pub fn candidates(what: &str, root: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
        let path = match what {
            "latest" => root.context("--restore latest needs --checkpoint-dir")?.to_path_buf(),
            p => PathBuf::from(p),
        };
        if path.file_name().and_then(|n| n.to_str()).and_then(step_of).is_some() {
            ensure!(path.is_dir(), "{} is not a folder", path.display());
            return Ok(vec![path]);
        }
        ensure!(what == "latest" || path.is_dir(), "{} is not a folder", path.display());
        Ok(step_dirs(&path)?.into_iter().map(|(_, d)| d).collect())
    }

    /// Tries `use_it` on the checkpoint folders `what` names (see
    /// [`candidates`](Self::candidates)), newest first, and returns the first success; each
    /// folder passed over is logged with the reason. `Ok(None)`: there were none; `Err`: every
    /// one failed (the last reason).
    pub fn first_usable<T>(what: &str, root: Option<&Path>, mut use_it: impl FnMut(&Path) -> anyhow::Result<T>) -> anyhow::Result<Option<T>> {
        let mut last_error = None;
        for dir in Self::candidates(what, root)? {
            match use_it(&dir) {
                Ok(t) => return Ok(Some(t)),
                Err(e) => {
                    tracing::warn!(checkpoint = %dir.display(), "skipping checkpoint: {e:#}");
                    last_error = Some(e);
                }
            }
        }
        last_error.map_or(Ok(None), Err)
    }

    /// `what` is `latest` (the newest under `root`) or a path: a checkpoint folder, or a
    /// folder of checkpoints (its newest complete and intact one).
    pub fn find(what: &str, root: Option<&Path>) -> anyhow::Result<Checkpoint> {
        Self::first_usable(what, root, Checkpoint::load)?.with_context(|| format!("no checkpoint in {what}"))
    }

    /// Every entry of a variable's parts, in row order, with the shard holding each.
    pub fn parts_of(&self, base: &str) -> anyhow::Result<Vec<(u32, &VariableEntry)>> {
        let mut parts: Vec<(u64, u64, u32, &VariableEntry)> = Vec::new();
        for m in &self.shards {
            for v in &m.variables {
                let (b, i, n) = split_part_name(&v.name);
                if b == base {
                    parts.push((i, n, m.shard, v));
                }
            }
        }
        parts.sort_by_key(|p| p.0);
        if let Some(&(_, n, _, _)) = parts.first() {
            let ok = parts.len() as u64 == n && parts.iter().enumerate().all(|(k, p)| p.0 == k as u64 && p.1 == n);
            ensure!(ok, "{}: the parts of {base} are not 0..{n} once each", self.dir.display());
        }
        Ok(parts.into_iter().map(|(_, _, s, v)| (s, v)).collect())
    }

    /// The names of the variables (whole, not parts), sorted.
    pub fn variable_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.shards.iter().flat_map(|m| m.variables.iter().map(|v| split_part_name(&v.name).0.to_string())).collect();
        names.sort();
        names.dedup();
        names
    }

    fn reader(&self, shard: u32) -> anyhow::Result<std::sync::Arc<Reader>> {
        let mut readers = self.readers.lock();
        if let Some(r) = readers.get(&shard) {
            return Ok(std::sync::Arc::clone(r));
        }
        let m = &self.shards[shard as usize];
        let r = std::sync::Arc::new(Reader::open(&self.dir.join(&m.file))?);
        readers.insert(shard, std::sync::Arc::clone(&r));
        Ok(r)
    }

    /// Rows `rows` of the variable called `base` (whole), cut from its parts: the values
    /// and each slot, the largest version and update count of the parts it spans.
    pub fn read_rows(&self, base: &str, rows: std::ops::Range<u64>) -> anyhow::Result<Option<(Whole, RestoredVariable)>> {
        let parts = self.parts_of(base)?;
        let Some(&(_, first)) = parts.first() else { return Ok(None) };
        let whole = Whole::of(base, &parts)?;
        ensure!(rows.start <= rows.end && rows.end <= whole.shape[0], "{base}: rows {rows:?} of {}", whole.shape[0]);
        let row_elems: u64 = whole.shape[1..].iter().product();
        let n = ((rows.end - rows.start) * row_elems) as usize;
        let dtype = whole.dtype;
        let mut values = match dtype {
            DType::F32 => Values::F32(vec![0.0; n]),
            DType::Bf16 => Values::Bf16(vec![0; n]),
        };
        let slot_names: Vec<String> = first.slots.keys().cloned().collect();
        let mut slots: Vec<Vec<f32>> = slot_names.iter().map(|_| vec![0.0f32; n]).collect();
        let (mut version, mut updates, mut clocks) = (0u64, 0u64, Vec::<u64>::new());
        let mut row = 0u64;
        for (shard, part) in &parts {
            let (a, b) = (row, row + part.shape[0]);
            row = b;
            let (o0, o1) = (a.max(rows.start), b.min(rows.end));
            if o0 >= o1 {
                continue;
            }
            let reader = self.reader(*shard)?;
            let src = (o0 - a) * row_elems..(o1 - a) * row_elems;
            let dst = ((o0 - rows.start) * row_elems) as usize..((o1 - rows.start) * row_elems) as usize;
            match &mut values {
                Values::F32(v) => reader.read_elements(&part.tensor, src.clone(), parasync_tensor::f32_as_le_bytes_mut(&mut v[dst.clone()]))?,
                Values::Bf16(v) => reader.read_elements(&part.tensor, src.clone(), parasync_tensor::u16_as_le_bytes_mut(&mut v[dst.clone()]))?,
            }
            ensure!(part.slots.keys().eq(slot_names.iter()), "{}: parts of {base} keep different slots", self.dir.display());
            for (slot, out) in part.slots.values().zip(&mut slots) {
                reader.read_elements(slot, src.clone(), parasync_tensor::f32_as_le_bytes_mut(&mut out[dst.clone()]))?;
            }
            version = version.max(part.version);
            updates = updates.max(part.updates);
            if clocks.len() < part.worker_clocks.len() {
                clocks.resize(part.worker_clocks.len(), 0);
            }
            for (c, &p) in clocks.iter_mut().zip(&part.worker_clocks) {
                *c = (*c).max(p);
            }
        }
        // The slots in the optimizer's order (the manifest lists them by name).
        let spec = first.optimizer.spec();
        let mut by_name: BTreeMap<String, Vec<f32>> = slot_names.into_iter().zip(slots).collect();
        let slots = spec
            .slot_names()
            .iter()
            .map(|s| by_name.remove(*s).map(std::sync::Arc::new).with_context(|| format!("{base}: no slot {s} in the checkpoint")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let optimizer = OptimizerSnapshot { lr: first.learning_rate, updates, slots };
        // A part cut from one old part whole keeps its record of pushes; one joined from
        // several does not (their sequence numbers belong to other variables).
        let last_pushes = match parts.as_slice() {
            [(_, only)] if rows.start == 0 && rows.end == only.shape[0] => only.last_pushes.iter().map(|p| p.get()).collect(),
            _ => Vec::new(),
        };
        Ok(Some((whole, RestoredVariable { version, values, optimizer, worker_clocks: clocks, last_pushes })))
    }

    /// The state of `def` (a whole variable or a part, named as the client's placement names
    /// them) in this checkpoint, cut from the old parts whatever shard count wrote them.
    pub fn variable_for(&self, def: &VariableDef) -> anyhow::Result<Option<RestoredVariable>> {
        let (base, p, n) = split_part_name(&def.name);
        let parts = self.parts_of(base)?;
        let Some(&(_, first)) = parts.first() else { return Ok(None) };
        let whole = Whole::of(base, &parts)?;
        let rows = whole.shape[0];
        let (r0, r1) = (p * rows / n, (p + 1) * rows / n);
        // What the checkpoint holds for this name, in the shape this part has now.
        let mut held = first.def()?;
        held.name = def.name.clone();
        held.shape = whole.shape.clone();
        held.shape[0] = r1 - r0;
        let diff = def.differences(&held);
        if !diff.is_empty() {
            bail!(
                "{} holds {base} otherwise (registered vs checkpoint, rows {r0}..{r1} of {:?}): {}",
                self.dir.display(),
                whole.shape,
                diff.join("; ")
            );
        }
        Ok(self.read_rows(base, r0..r1)?.map(|(_, r)| r))
    }
}

/// The buffers a table's tensors are read into, checked against its manifest entry.
struct TableBuffers<'a> {
    entry: &'a TableEntry,
    def: TableDef,
    ids: Vec<u8>,
    values: RowValues,
    slots: Vec<Vec<f32>>,
    meta: Vec<u8>,
    seen_ids: Vec<u8>,
    seen_counts: Vec<u8>,
}

impl<'a> TableBuffers<'a> {
    /// Checks that the file holds the entry's tensors with the dtypes and shapes the entry
    /// implies, and makes buffers for them.
    fn new(reader: &Reader, entry: &'a TableEntry) -> anyhow::Result<TableBuffers<'a>> {
        let def = entry.def()?;
        let (n, dim, seen) = (entry.rows, entry.dim as u64, entry.seen);
        let names = &entry.tensors;
        let expect = |name: &str, dtype: Dtype, shape: &[u64]| -> anyhow::Result<usize> {
            let info = reader.info(name)?;
            ensure!(
                info.dtype == dtype && info.shape == shape,
                "table {}: tensor {name} is {} {:?}, the manifest implies {dtype} {shape:?}",
                entry.name,
                info.dtype,
                info.shape
            );
            Ok(usize::try_from(info.elements())?)
        };
        expect(&names.ids, Dtype::U64, &[n])?;
        let values = match def.dtype {
            DType::F32 => RowValues::F32(vec![0.0; expect(&names.values, Dtype::F32, &[n, dim])?]),
            DType::Bf16 => RowValues::Bf16(vec![0; expect(&names.values, Dtype::Bf16, &[n, dim])?]),
        };
        let mut slots = Vec::new();
        for s in def.optimizer.slot_names() {
            let name = names.slots.get(*s).with_context(|| format!("table {}: no tensor of slot {s}", entry.name))?;
            slots.push(vec![0f32; expect(name, Dtype::F32, &[n, dim])?]);
        }
        let meta = vec![0u8; expect(&names.meta, Dtype::U64, &[n, 4])? * 8];
        let seen_ids = vec![0u8; expect(&names.seen_ids, Dtype::U64, &[seen])? * 8];
        let seen_counts = vec![0u8; expect(&names.seen_counts, Dtype::U32, &[seen])? * 4];
        ensure!(!entry.stripes.is_empty(), "table {}: no stripe state", entry.name);
        Ok(TableBuffers { ids: vec![0u8; n as usize * 8], def, entry, values, slots, meta, seen_ids, seen_counts })
    }

    /// (tensor, buffer) of each tensor.
    fn targets(&mut self) -> Vec<(&'a str, &mut [u8])> {
        let names = &self.entry.tensors;
        let mut out: Vec<(&'a str, &mut [u8])> = vec![
            (names.ids.as_str(), &mut self.ids[..]),
            (
                names.values.as_str(),
                match &mut self.values {
                    RowValues::F32(v) => parasync_tensor::f32_as_le_bytes_mut(v),
                    RowValues::Bf16(v) => parasync_tensor::u16_as_le_bytes_mut(v),
                },
            ),
        ];
        for (s, buf) in self.def.optimizer.slot_names().iter().zip(self.slots.iter_mut()) {
            out.push((names.slots[*s].as_str(), parasync_tensor::f32_as_le_bytes_mut(buf)));
        }
        out.push((names.meta.as_str(), &mut self.meta[..]));
        out.push((names.seen_ids.as_str(), &mut self.seen_ids[..]));
        out.push((names.seen_counts.as_str(), &mut self.seen_counts[..]));
        out
    }

    /// The table read.
    fn finish(self) -> anyhow::Result<RestoredTable> {
        use super::safetensors::{u32s_from_le, u64s_from_le};
        let meta = u64s_from_le(&self.meta);
        let narrow = |x: u64, what: &str| u32::try_from(x).with_context(|| format!("table {}: {what} {x} out of range", self.entry.name));
        let meta = meta
            .chunks_exact(4)
            .map(|m| Ok(RowState { tick: m[0], updates: narrow(m[1], "update count")?, steps: narrow(m[2], "step count")?, step: m[3] }))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rows = PackedRows {
            dim: self.def.dim as usize,
            ids: u64s_from_le(&self.ids),
            values: self.values,
            slots: self.slots,
            meta,
            seen_ids: u64s_from_le(&self.seen_ids),
            seen_counts: u32s_from_le(&self.seen_counts),
        };
        rows.check().map_err(|e| anyhow::anyhow!("table {}: {e}", self.entry.name))?;
        Ok(RestoredTable {
            def: self.def,
            version: self.entry.version,
            worker_clocks: self.entry.worker_clocks.clone(),
            learning_rate: self.entry.learning_rate,
            rows,
            stripes: self.entry.stripes.iter().map(|s| s.get()).collect(),
        })
    }
}

/// A file's size and checksum against its manifest's.
fn check_file(path: &Path, m: &ShardManifest, got: super::safetensors::Written) -> anyhow::Result<()> {
    let crc = format!("{:08x}", got.crc32);
    ensure!(
        got.bytes == m.bytes && crc == m.crc32,
        "{}: {} bytes with CRC-32 {crc}, the manifest says {} bytes with {}",
        path.display(),
        got.bytes,
        m.bytes,
        m.crc32
    );
    Ok(())
}

/// A whole variable as its parts describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct Whole {
    pub shape: Vec<u64>,
    pub dtype: DType,
}

impl Whole {
    fn of(base: &str, parts: &[(u32, &VariableEntry)]) -> anyhow::Result<Whole> {
        let first = parts[0].1;
        let tail = &first.shape[1..];
        let mut rows = 0u64;
        for (_, p) in parts {
            ensure!(
                p.shape.len() == first.shape.len() && &p.shape[1..] == tail && p.dtype == first.dtype && p.optimizer == first.optimizer,
                "the parts of {base} disagree: {} {:?} {} vs {} {:?} {}",
                first.name,
                first.shape,
                first.dtype,
                p.name,
                p.shape,
                p.dtype
            );
            rows += p.shape[0];
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        Ok(Whole { shape, dtype: super::manifest::parse_dtype(&first.dtype)? })
    }
}

impl RestoreSource for Checkpoint {
    fn variable(&self, def: &VariableDef) -> Result<Option<RestoredVariable>> {
        self.variable_for(def).map_err(|e| Error::Conflict { variable: def.name.clone(), reason: format!("{e:#}") })
    }
}
