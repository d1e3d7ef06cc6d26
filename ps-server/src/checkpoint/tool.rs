//! `parasync checkpoint inspect | export`: what a checkpoint holds, and its variables joined
//! into whole tensors in one safetensors file (sparse tables as their ids and rows).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use super::restore::Checkpoint;
use super::safetensors::{self, TensorOut};
use super::{joined_manifest, slot_tensor_name};
use crate::store::Values;

/// Look into checkpoints without a running server.
#[derive(Subcommand, Debug)]
pub enum CheckpointCmd {
    /// List the files, sparse tables (rows and version per shard), variables, shapes,
    /// optimizers and parts of a checkpoint (a `step-<n>` folder, or a folder of them: its
    /// newest complete one). Checksums are verified.
    Inspect {
        path: PathBuf,
        /// Print the whole-checkpoint manifest as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Join the parts of every variable into whole tensors in one safetensors file; each sparse
    /// table as `table:<name>:ids` (U64, sorted) and `table:<name>:values` (its rows).
    Export(ExportArgs),
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A `step-<n>` folder, or a folder of them (its newest complete one).
    pub path: PathBuf,
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Also export the optimizer slots, as `<name>:<slot>` (e.g. `w:exp_avg`; a table's as
    /// `table:<name>:<slot>`).
    #[arg(long)]
    pub slots: bool,
}

/// Runs a `parasync checkpoint` command.
pub fn run(cmd: &CheckpointCmd) -> anyhow::Result<()> {
    match cmd {
        CheckpointCmd::Inspect { path, json } => {
            let c = open(path)?;
            let mut out = std::io::stdout().lock();
            if *json {
                serde_json::to_writer_pretty(&mut out, &joined_manifest(c.shards.iter()))?;
                writeln!(out)?;
            } else {
                inspect(&c, &mut out)?;
            }
            Ok(())
        }
        CheckpointCmd::Export(args) => {
            let c = open(&args.path)?;
            let (n, bytes) = export(&c, &args.out, args.slots)?;
            println!("exported {n} tensors of {} (step {}) to {}: {bytes} bytes", c.dir.display(), c.step, args.out.display());
            Ok(())
        }
    }
}

fn open(path: &Path) -> anyhow::Result<Checkpoint> {
    Checkpoint::find(&path.to_string_lossy(), None)
}

/// Writes a listing of `c` to `out`.
pub fn inspect(c: &Checkpoint, out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(out, "checkpoint {}: step {}, {} mode, {} shard(s), checksums match", c.dir.display(), c.step, c.mode, c.num_shards)?;
    for m in &c.shards {
        writeln!(out, "  {}  {} bytes  crc32 {}  {} variable(s)", m.file, m.bytes, m.crc32, m.variables.len())?;
    }
    let manifest = joined_manifest(c.shards.iter());
    let entries: BTreeMap<&str, &super::manifest::VariableEntry> =
        c.shards.iter().flat_map(|m| m.variables.iter().map(|v| (v.name.as_str(), v))).collect();
    if !manifest.tables.is_empty() {
        let entries: BTreeMap<(u32, &str), &super::manifest::TableEntry> =
            c.shards.iter().flat_map(|m| m.tables.iter().map(move |t| ((m.shard, t.name.as_str()), t))).collect();
        writeln!(out, "tables ({}):", manifest.tables.len())?;
        for t in &manifest.tables {
            writeln!(out, "  {}  dim {} {}  {}  rows {}  version {}", t.name, t.dim, t.dtype, t.optimizer, t.rows, t.version)?;
            for s in &t.shards {
                let e = entries[&(s.shard, t.name.as_str())];
                writeln!(
                    out,
                    "      shard {}: rows {}  version {}  lr {}  admitted {}  evicted {}  dropped {}",
                    s.shard, s.rows, s.version, e.learning_rate, e.counts.admitted, e.counts.evicted, e.counts.dropped
                )?;
            }
        }
    }
    writeln!(out, "variables ({}):", manifest.variables.len())?;
    for v in &manifest.variables {
        let first = entries[v.parts[0].name.as_str()];
        let spec = v.optimizer.spec();
        let slots = spec.slot_names();
        writeln!(
            out,
            "  {}  {:?} {}  {} lr {}{}  version {}  updates {}",
            v.name,
            v.shape,
            v.dtype,
            spec.name(),
            first.learning_rate,
            if slots.is_empty() { String::new() } else { format!(" (slots {})", slots.join(", ")) },
            first.version,
            first.updates
        )?;
        if v.parts.len() > 1 || v.parts[0].name != v.name {
            for p in &v.parts {
                writeln!(out, "      rows {}..{} on shard {} as {}", p.rows[0], p.rows[1], p.shard, p.name)?;
            }
        } else {
            writeln!(out, "      on shard {}", v.parts[0].shard)?;
        }
    }
    Ok(())
}

/// Writes every variable of `c` whole (and its slots with `slots`), and every table's ids and
/// rows (and slots), to `out`; returns the number of tensors and the file's size.
pub fn export(c: &Checkpoint, out: &Path, slots: bool) -> anyhow::Result<(usize, u64)> {
    let mut held = Vec::new();
    for name in c.variable_names() {
        let parts = c.parts_of(&name)?;
        let rows: u64 = parts.iter().map(|(_, v)| v.shape[0]).sum();
        let (whole, r) = c.read_rows(&name, 0..rows)?.with_context(|| format!("{name} vanished"))?;
        let spec = parts[0].1.optimizer.spec();
        held.push((name, whole, r, spec));
    }
    let mut tensors = Vec::new();
    for (name, whole, r, spec) in &held {
        let data = match &r.values {
            Values::F32(v) => parasync_tensor::f32_as_le_bytes(v),
            Values::Bf16(v) => parasync_tensor::u16_as_le_bytes(v),
        };
        tensors.push(TensorOut { name: name.clone(), dtype: whole.dtype.into(), shape: whole.shape.clone(), data });
        if slots {
            for (slot, values) in spec.slot_names().iter().zip(&r.optimizer.slots) {
                tensors.push(TensorOut {
                    name: slot_tensor_name(name, slot),
                    dtype: safetensors::Dtype::F32,
                    shape: whole.shape.clone(),
                    data: parasync_tensor::f32_as_le_bytes(values),
                });
            }
        }
    }
    // Tables whole: every shard's rows, as ids and values (and slots).
    let tables: Vec<crate::sparse::RestoredTable> = c
        .read_tables_routed(0, 1)?
        .into_iter()
        .map(|mut t| {
            t.rows = t.rows.sorted();
            t
        })
        .collect();
    let table_bytes: Vec<(Vec<u8>, &crate::sparse::RestoredTable)> =
        tables.iter().map(|t| (safetensors::u64_le_bytes(&t.rows.ids), t)).collect();
    for (ids, t) in &table_bytes {
        let (n, dim) = (t.rows.len() as u64, t.def.dim as u64);
        let name = &t.def.name;
        tensors.push(TensorOut { name: super::table_tensor_name(name, "ids"), dtype: safetensors::Dtype::U64, shape: vec![n], data: ids });
        let (dtype, data) = match &t.rows.values {
            crate::sparse::RowValues::F32(v) => (safetensors::Dtype::F32, parasync_tensor::f32_as_le_bytes(v)),
            crate::sparse::RowValues::Bf16(v) => (safetensors::Dtype::Bf16, parasync_tensor::u16_as_le_bytes(v)),
        };
        tensors.push(TensorOut { name: super::table_tensor_name(name, "values"), dtype, shape: vec![n, dim], data });
        if slots {
            for (slot, values) in t.def.optimizer.slot_names().iter().zip(&t.rows.slots) {
                tensors.push(TensorOut {
                    name: super::table_tensor_name(name, slot),
                    dtype: safetensors::Dtype::F32,
                    shape: vec![n, dim],
                    data: parasync_tensor::f32_as_le_bytes(values),
                });
            }
        }
    }
    let metadata = BTreeMap::from([("step".to_string(), c.step.to_string()), ("source".to_string(), c.dir.display().to_string())]);
    let tmp = out.with_extension("safetensors.tmp");
    let written = safetensors::write(&tmp, &tensors, &metadata)?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok((tensors.len(), written.bytes))
}
