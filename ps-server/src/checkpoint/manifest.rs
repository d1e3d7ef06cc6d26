//! The JSON manifests of a checkpoint: one per shard file (the record that the file is
//! complete, and its checksum), and `manifest.json`, the whole checkpoint joined.

use std::collections::BTreeMap;

use parasync_tensor::DType;
use serde::{Deserialize, Serialize};

use crate::optimizer::OptimizerSpec;
use crate::sparse::{Admission, Eviction, RowInit, RowOptimizer, StripeState, TableCounts, TableDef};
use crate::store::VariableDef;

/// The `format` every manifest carries.
pub const FORMAT: &str = "parasync-checkpoint/1";

/// Shard `shard`'s part of a checkpoint: written last, after its safetensors file, so a
/// shard file without its manifest is a write that did not finish.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardManifest {
    pub format: String,
    /// Sync: the step every variable had completed. Async / bounded: the step that triggered
    /// the checkpoint (each variable's own version is in its entry).
    pub step: u64,
    pub mode: String,
    pub shard: u32,
    pub num_shards: u32,
    /// The safetensors file, in the same folder.
    pub file: String,
    pub bytes: u64,
    /// CRC-32 (IEEE) of the whole file, 8 hex digits.
    pub crc32: String,
    pub written_unix_ms: u64,
    pub variables: Vec<VariableEntry>,
    /// The shard's sparse tables (none in checkpoints written before there were tables).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<TableEntry>,
}

/// One variable (or part of a split variable) of a shard file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VariableEntry {
    /// The name on the shard: the variable's, or `name/part-i-of-n` for a part of a split one.
    pub name: String,
    pub shape: Vec<u64>,
    /// Storage dtype: `f32` or `bf16`.
    pub dtype: String,
    pub optimizer: OptimizerEntry,
    #[serde(default)]
    pub stochastic_rounding: bool,
    /// Completed sync steps, or applied updates.
    pub version: u64,
    /// The learning rate in use (a schedule may have changed it from the optimizer's).
    pub learning_rate: f32,
    /// Updates applied (Adam's step count).
    pub updates: u64,
    /// Bounded mode: each worker's pushed steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worker_clocks: Vec<u64>,
    /// Per worker, the last push its client had applied here (see `PushHeader.sequence`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_pushes: Vec<LastPush>,
    /// The tensor holding the values.
    pub tensor: String,
    /// Optimizer slot name (`exp_avg`, `momentum_buffer`, …) → its tensor.
    #[serde(default)]
    pub slots: BTreeMap<String, String>,
}

impl VariableEntry {
    /// The definition this entry was written from.
    pub fn def(&self) -> anyhow::Result<VariableDef> {
        Ok(VariableDef {
            name: self.name.clone(),
            shape: self.shape.clone(),
            dtype: parse_dtype(&self.dtype)?,
            optimizer: self.optimizer.spec(),
            stochastic_rounding: self.stochastic_rounding,
        })
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::Bf16),
        other => anyhow::bail!("unknown dtype {other:?}"),
    }
}

/// The last push a worker's client had applied to a variable, and what it did.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct LastPush {
    pub worker: u32,
    pub incarnation: u64,
    pub sequence: u64,
    pub accepted: bool,
    pub dropped_stale: bool,
    pub version: u64,
    pub staleness: u64,
}

impl LastPush {
    pub fn new(worker: u32, id: crate::store::PushId, r: crate::store::PushResult) -> LastPush {
        LastPush {
            worker,
            incarnation: id.incarnation,
            sequence: id.sequence,
            accepted: r.accepted,
            dropped_stale: r.dropped_stale,
            version: r.version,
            staleness: r.staleness,
        }
    }

    pub fn get(&self) -> (u32, crate::store::PushId, crate::store::PushResult) {
        let id = crate::store::PushId { incarnation: self.incarnation, sequence: self.sequence };
        let r = crate::store::PushResult {
            accepted: self.accepted,
            dropped_stale: self.dropped_stale,
            version: self.version,
            staleness: self.staleness,
            duplicate: false,
        };
        (self.worker, id, r)
    }
}

/// An optimizer and its hyper-parameters, as JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerEntry {
    Sgd { lr: f32, momentum: f32, nesterov: bool },
    Adagrad { lr: f32, initial_accumulator: f32, epsilon: f32 },
    Adam { lr: f32, beta1: f32, beta2: f32, epsilon: f32, weight_decay: f32 },
    Adamw { lr: f32, beta1: f32, beta2: f32, epsilon: f32, weight_decay: f32 },
}

impl OptimizerEntry {
    pub fn new(spec: &OptimizerSpec) -> OptimizerEntry {
        match *spec {
            OptimizerSpec::Sgd { lr, momentum, nesterov } => OptimizerEntry::Sgd { lr, momentum, nesterov },
            OptimizerSpec::Adagrad { lr, initial_accumulator, epsilon } => OptimizerEntry::Adagrad { lr, initial_accumulator, epsilon },
            OptimizerSpec::Adam { lr, beta1, beta2, epsilon, weight_decay, decoupled: false } => {
                OptimizerEntry::Adam { lr, beta1, beta2, epsilon, weight_decay }
            }
            OptimizerSpec::Adam { lr, beta1, beta2, epsilon, weight_decay, decoupled: true } => {
                OptimizerEntry::Adamw { lr, beta1, beta2, epsilon, weight_decay }
            }
        }
    }

    pub fn spec(&self) -> OptimizerSpec {
        match *self {
            OptimizerEntry::Sgd { lr, momentum, nesterov } => OptimizerSpec::Sgd { lr, momentum, nesterov },
            OptimizerEntry::Adagrad { lr, initial_accumulator, epsilon } => OptimizerSpec::Adagrad { lr, initial_accumulator, epsilon },
            OptimizerEntry::Adam { lr, beta1, beta2, epsilon, weight_decay } => {
                OptimizerSpec::Adam { lr, beta1, beta2, epsilon, weight_decay, decoupled: false }
            }
            OptimizerEntry::Adamw { lr, beta1, beta2, epsilon, weight_decay } => {
                OptimizerSpec::Adam { lr, beta1, beta2, epsilon, weight_decay, decoupled: true }
            }
        }
    }
}

/// `manifest.json`: the checkpoint as a whole, written once every shard's part is there.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub mode: String,
    pub num_shards: u32,
    pub files: Vec<FileEntry>,
    pub variables: Vec<WholeVariable>,
    /// Every sparse table and its rows on each shard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<WholeTable>,
}

/// A shard file and its checksum.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub shard: u32,
    pub file: String,
    pub bytes: u64,
    pub crc32: String,
}

/// A whole variable and where its rows are.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WholeVariable {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: String,
    pub optimizer: OptimizerEntry,
    pub parts: Vec<PartEntry>,
}

/// Rows `rows[0]..rows[1]` of a variable, held by `shard` under the name `name`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartEntry {
    pub name: String,
    pub shard: u32,
    pub rows: [u64; 2],
}

/// One sparse table of a shard file: its definition, clock, learning rate and counters, and
/// the tensors holding its rows (see the module docs of `checkpoint` for their layout).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TableEntry {
    pub name: String,
    pub dim: u32,
    /// Storage dtype of the rows: `f32` or `bf16`.
    pub dtype: String,
    pub init: RowInitEntry,
    pub optimizer: RowOptimizerEntry,
    pub admission: AdmissionEntry,
    pub eviction: EvictionEntry,
    /// Rows a shard holds at most (0: no limit).
    pub capacity: u64,
    /// Completed sync steps, or applied pushes.
    pub version: u64,
    /// The learning rate in use.
    pub learning_rate: f32,
    /// Bounded mode: each worker's pushed steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worker_clocks: Vec<u64>,
    /// Rows held.
    pub rows: u64,
    /// Ids waiting for admission (with a count).
    pub seen: u64,
    /// Counters summed over the stripes.
    pub counts: CountsEntry,
    /// Each stripe's clock and counters, in stripe order.
    pub stripes: Vec<StripeEntry>,
    pub tensors: TableTensors,
}

/// A table's counters.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountsEntry {
    pub admitted: u64,
    pub evicted: u64,
    pub dropped: u64,
    pub updated: u64,
    #[serde(default)]
    pub admission_resets: u64,
}

impl CountsEntry {
    pub fn new(c: &TableCounts) -> CountsEntry {
        CountsEntry { admitted: c.admitted, evicted: c.evicted, dropped: c.dropped, updated: c.updated, admission_resets: c.admission_resets }
    }

    pub fn get(&self) -> TableCounts {
        TableCounts {
            admitted: self.admitted,
            evicted: self.evicted,
            dropped: self.dropped,
            updated: self.updated,
            admission_resets: self.admission_resets,
        }
    }
}

/// One stripe's tick (the clock of least-recently-used order), last time-to-live sweep and counters.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StripeEntry {
    pub tick: u64,
    pub swept_at: u64,
    #[serde(flatten)]
    pub counts: CountsEntry,
}

impl StripeEntry {
    pub fn new(s: &StripeState) -> StripeEntry {
        StripeEntry { tick: s.tick, swept_at: s.swept_at, counts: CountsEntry::new(&s.counts) }
    }

    pub fn get(&self) -> StripeState {
        StripeState { tick: self.tick, swept_at: self.swept_at, counts: self.counts.get() }
    }
}

/// The tensors of a table in its shard file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TableTensors {
    /// U64 `[rows]`.
    pub ids: String,
    /// The storage dtype, `[rows, dim]`.
    pub values: String,
    /// U64 `[rows, 4]`: per row its tick, updates, own step count and last step.
    pub meta: String,
    /// U64 `[seen]` and U32 `[seen]`: ids not admitted yet and how often each was seen.
    pub seen_ids: String,
    pub seen_counts: String,
    /// Optimizer slot name (`accumulator`, `m`, `v`, `linear`) → its F32 `[rows, dim]` tensor.
    #[serde(default)]
    pub slots: BTreeMap<String, String>,
}

/// How a table's new rows start, as JSON.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RowInitEntry {
    Zeros,
    Uniform { low: f32, high: f32, seed: u64 },
    Normal { mean: f32, stddev: f32, seed: u64 },
}

/// A table's row optimizer, as JSON.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RowOptimizerEntry {
    Sgd { lr: f32 },
    Adagrad { lr: f32, initial_accumulator: f32, epsilon: f32 },
    Adam { lr: f32, beta1: f32, beta2: f32, epsilon: f32 },
    Ftrl { lr: f32, initial_accumulator: f32, l1: f32, l2: f32, beta: f32 },
}

/// A table's admission policy, as JSON.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdmissionEntry {
    Always,
    MinCount { n: u32 },
    Probability { p: f32, seed: u64 },
}

/// A table's eviction policy, as JSON.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EvictionEntry {
    None,
    Lru,
    Lfu,
    Ttl { steps: u64 },
}

impl TableEntry {
    /// The entry of `def`'s definition with everything else zero and no tensors named.
    pub fn of_def(def: &TableDef) -> TableEntry {
        TableEntry {
            name: def.name.clone(),
            dim: def.dim,
            dtype: match def.dtype {
                DType::F32 => "f32".into(),
                DType::Bf16 => "bf16".into(),
            },
            init: match def.init {
                RowInit::Zeros => RowInitEntry::Zeros,
                RowInit::Uniform { low, high, seed } => RowInitEntry::Uniform { low, high, seed },
                RowInit::Normal { mean, stddev, seed } => RowInitEntry::Normal { mean, stddev, seed },
            },
            optimizer: match def.optimizer {
                RowOptimizer::Sgd { lr } => RowOptimizerEntry::Sgd { lr },
                RowOptimizer::Adagrad { lr, initial_accumulator, epsilon } => RowOptimizerEntry::Adagrad { lr, initial_accumulator, epsilon },
                RowOptimizer::Adam { lr, beta1, beta2, epsilon } => RowOptimizerEntry::Adam { lr, beta1, beta2, epsilon },
                RowOptimizer::Ftrl { lr, initial_accumulator, l1, l2, beta } => {
                    RowOptimizerEntry::Ftrl { lr, initial_accumulator, l1, l2, beta }
                }
            },
            admission: match def.admission {
                Admission::Always => AdmissionEntry::Always,
                Admission::MinCount(n) => AdmissionEntry::MinCount { n },
                Admission::Probability { p, seed } => AdmissionEntry::Probability { p, seed },
            },
            eviction: match def.eviction {
                Eviction::None => EvictionEntry::None,
                Eviction::Lru => EvictionEntry::Lru,
                Eviction::Lfu => EvictionEntry::Lfu,
                Eviction::Ttl { steps } => EvictionEntry::Ttl { steps },
            },
            capacity: def.capacity,
            version: 0,
            learning_rate: def.optimizer.learning_rate(),
            worker_clocks: Vec::new(),
            rows: 0,
            seen: 0,
            counts: CountsEntry::default(),
            stripes: Vec::new(),
            tensors: TableTensors {
                ids: String::new(),
                values: String::new(),
                meta: String::new(),
                seen_ids: String::new(),
                seen_counts: String::new(),
                slots: BTreeMap::new(),
            },
        }
    }

    /// The definition this entry was written from.
    pub fn def(&self) -> anyhow::Result<TableDef> {
        let def = TableDef {
            name: self.name.clone(),
            dim: self.dim,
            dtype: parse_dtype(&self.dtype)?,
            init: match self.init {
                RowInitEntry::Zeros => RowInit::Zeros,
                RowInitEntry::Uniform { low, high, seed } => RowInit::Uniform { low, high, seed },
                RowInitEntry::Normal { mean, stddev, seed } => RowInit::Normal { mean, stddev, seed },
            },
            optimizer: match self.optimizer {
                RowOptimizerEntry::Sgd { lr } => RowOptimizer::Sgd { lr },
                RowOptimizerEntry::Adagrad { lr, initial_accumulator, epsilon } => RowOptimizer::Adagrad { lr, initial_accumulator, epsilon },
                RowOptimizerEntry::Adam { lr, beta1, beta2, epsilon } => RowOptimizer::Adam { lr, beta1, beta2, epsilon },
                RowOptimizerEntry::Ftrl { lr, initial_accumulator, l1, l2, beta } => {
                    RowOptimizer::Ftrl { lr, initial_accumulator, l1, l2, beta }
                }
            },
            admission: match self.admission {
                AdmissionEntry::Always => Admission::Always,
                AdmissionEntry::MinCount { n } => Admission::MinCount(n),
                AdmissionEntry::Probability { p, seed } => Admission::Probability { p, seed },
            },
            eviction: match self.eviction {
                EvictionEntry::None => Eviction::None,
                EvictionEntry::Lru => Eviction::Lru,
                EvictionEntry::Lfu => Eviction::Lfu,
                EvictionEntry::Ttl { steps } => Eviction::Ttl { steps },
            },
            capacity: self.capacity,
        };
        def.validate().map_err(|e| anyhow::anyhow!("table {}: {e}", self.name))?;
        Ok(def)
    }
}

/// A whole sparse table in `manifest.json`: its rows spread over the shards by id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WholeTable {
    pub name: String,
    pub dim: u32,
    pub dtype: String,
    /// The row optimizer's name.
    pub optimizer: String,
    /// Rows held, over all shards.
    pub rows: u64,
    /// The highest version of its shards (in sync mode all have the step's).
    pub version: u64,
    pub shards: Vec<TableShardEntry>,
}

/// A table's rows on one shard.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TableShardEntry {
    pub shard: u32,
    pub rows: u64,
    pub version: u64,
}

/// Splits a name on a shard into the variable's name and the part it is: `("w", 1, 3)` for
/// `w/part-1-of-3` (the client's placement names parts so), `(name, 0, 1)` for a whole one.
pub fn split_part_name(name: &str) -> (&str, u64, u64) {
    let parse = || -> Option<(&str, u64, u64)> {
        let (base, part) = name.rsplit_once("/part-")?;
        let (i, n) = part.split_once("-of-")?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(i) || !digits(n) {
            return None;
        }
        let (i, n) = (i.parse().ok()?, n.parse().ok()?);
        (i < n && !base.is_empty()).then_some((base, i, n))
    };
    parse().unwrap_or((name, 0, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_split_into_variable_and_part() {
        assert_eq!(split_part_name("emb/part-1-of-3"), ("emb", 1, 3));
        assert_eq!(split_part_name("l1/w/part-0-of-2"), ("l1/w", 0, 2));
        assert_eq!(split_part_name("l1/w"), ("l1/w", 0, 1));
        assert_eq!(split_part_name("x/part-3-of-3"), ("x/part-3-of-3", 0, 1));
        assert_eq!(split_part_name("x/part-a-of-3"), ("x/part-a-of-3", 0, 1));
    }

    #[test]
    fn optimizers_round_trip_through_json() {
        for spec in [
            OptimizerSpec::Sgd { lr: 0.1, momentum: 0.9, nesterov: true },
            OptimizerSpec::Adagrad { lr: 0.01, initial_accumulator: 0.1, epsilon: 1e-10 },
            OptimizerSpec::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0, decoupled: false },
            OptimizerSpec::Adam { lr: 3e-4, beta1: 0.8, beta2: 0.99, epsilon: 1e-7, weight_decay: 0.01, decoupled: true },
        ] {
            let json = serde_json::to_string(&OptimizerEntry::new(&spec)).unwrap();
            let back: OptimizerEntry = serde_json::from_str(&json).unwrap();
            assert_eq!(back.spec(), spec, "{json}");
        }
    }
}
