//! Sparse tables from the client: register a table on every shard, look up rows by id, push
//! gradient rows by id.
//!
//! A batch's ids are made unique first (a lookup fetches each row once and copies it to
//! every place the id appears; a push sums the rows of repeated ids in the order they
//! appear), then split by shard (`parasync_proto::sparse::shard_of_id`), and the parts go
//! to their shards at once.
//!
//! Over gRPC (a shard without a data plane, or `data_plane: false`) a shard's part of a
//! lookup goes as several requests when its rows would exceed [`GRPC_LOOKUP_BYTES`] (the
//! shards refuse replies past their `--max-message-bytes`, 16 MiB by default); a push goes
//! as one request per shard always (a sync step counts one push per worker and shard), and
//! one past the client's gRPC request limit fails before anything is sent.

use futures::future::try_join_all;
use parasync_proto::names::{self, Quoted};
use parasync_proto::ps;
use parasync_proto::sparse::{shard_of_id, UniqueIds};
use parasync_tensor::DType;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::spec::dtype_to_proto;

/// The optimizer of a table's rows (each row is updated only when a push names it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TableOptimizer {
    /// `w -= lr * g`.
    Sgd { lr: f32 },
    /// Adagrad with a per-element accumulator.
    Adagrad { lr: f32, initial_accumulator: f32, epsilon: f32 },
    /// "Lazy" Adam: each row counts its own steps for the bias correction.
    Adam { lr: f32, beta1: f32, beta2: f32, epsilon: f32 },
    /// FTRL-proximal (TensorFlow's `Ftrl`, learning-rate power −½).
    Ftrl { lr: f32, initial_accumulator: f32, l1: f32, l2: f32, beta: f32 },
}

/// How a new row starts: the values depend on the seed and the id only.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowInit {
    Zeros,
    Uniform { low: f32, high: f32, seed: u64 },
    Normal { mean: f32, stddev: f32, seed: u64 },
}

/// When an id gets a row (until then its lookups return the initial row and its updates
/// are dropped, and counted).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admission {
    /// On its first update.
    Always,
    /// On its `n`-th update.
    MinCount(u32),
    /// On each update with probability `p` (a seeded hash: the same stream admits the same ids).
    Probability { p: f32, seed: u64 },
}

/// What makes room when a shard's table holds its capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Eviction {
    /// Nothing: new rows past the capacity are not created.
    None,
    /// Least recently updated rows go first.
    Lru,
    /// Least often updated rows go first.
    Lfu,
    /// Rows not updated for `steps` steps go.
    Ttl { steps: u64 },
}

/// A sparse table as a trainer declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct TableSpec {
    /// Unique among the tables.
    pub name: String,
    /// Elements per row.
    pub dim: usize,
    /// Storage dtype of the rows.
    pub dtype: DType,
    pub init: RowInit,
    pub optimizer: TableOptimizer,
    pub admission: Admission,
    pub eviction: Eviction,
    /// Rows one shard holds at most (0: no limit).
    pub capacity: u64,
}

impl TableSpec {
    /// An f32 table of `dim`-element rows starting at zero, with SGD at 0.01, every id
    /// admitted and no capacity; adjust fields as needed.
    pub fn new(name: impl Into<String>, dim: usize) -> Self {
        TableSpec {
            name: name.into(),
            dim,
            dtype: DType::F32,
            init: RowInit::Zeros,
            optimizer: TableOptimizer::Sgd { lr: 0.01 },
            admission: Admission::Always,
            eviction: Eviction::None,
            capacity: 0,
        }
    }

    fn to_proto(&self) -> Result<ps::RegisterTableRequest> {
        let dim = u32::try_from(self.dim).map_err(|_| Error::usage(format!("table {}: dim {} is too large", Quoted(&self.name), self.dim)))?;
        let init = match self.init {
            RowInit::Zeros => None,
            RowInit::Uniform { low, high, seed } => Some(ps::row_initializer::Kind::Uniform(ps::UniformInit { low, high, seed })),
            RowInit::Normal { mean, stddev, seed } => Some(ps::row_initializer::Kind::Normal(ps::NormalInit { mean, stddev, seed })),
        };
        use ps::row_optimizer::Kind;
        let optimizer = match self.optimizer {
            TableOptimizer::Sgd { lr } => Kind::Sgd(ps::Sgd { learning_rate: lr, momentum: 0.0, nesterov: false }),
            TableOptimizer::Adagrad { lr, initial_accumulator, epsilon } => {
                Kind::Adagrad(ps::Adagrad { learning_rate: lr, initial_accumulator, epsilon })
            }
            TableOptimizer::Adam { lr, beta1, beta2, epsilon } => {
                Kind::Adam(ps::Adam { learning_rate: lr, beta1, beta2, epsilon, weight_decay: 0.0, decoupled: false })
            }
            TableOptimizer::Ftrl { lr, initial_accumulator, l1, l2, beta } => {
                Kind::Ftrl(ps::Ftrl { learning_rate: lr, initial_accumulator, l1, l2, beta })
            }
        };
        let (admit_min_count, admit_probability, admit_seed) = match self.admission {
            Admission::Always => (0, 0.0, 0),
            Admission::MinCount(n) => (n.max(1), 0.0, 0),
            Admission::Probability { p, seed } => (0, p, seed),
        };
        let (eviction, ttl_steps) = match self.eviction {
            Eviction::None => (ps::EvictionPolicy::None, 0),
            Eviction::Lru => (ps::EvictionPolicy::Lru, 0),
            Eviction::Lfu => (ps::EvictionPolicy::Lfu, 0),
            Eviction::Ttl { steps } => (ps::EvictionPolicy::Ttl, steps),
        };
        Ok(ps::RegisterTableRequest {
            name: self.name.clone(),
            dim,
            storage_dtype: dtype_to_proto(self.dtype),
            init: Some(ps::RowInitializer { kind: init }),
            optimizer: Some(ps::RowOptimizer { kind: Some(optimizer) }),
            admit_min_count,
            admit_probability,
            admit_seed,
            eviction: eviction as i32,
            ttl_steps,
            capacity: self.capacity,
        })
    }
}

/// What the client remembers of a table: its row width and, per shard, the version its
/// last lookup saw (the base of its next async push).
#[derive(Debug)]
pub(crate) struct KnownTable {
    dim: usize,
    versions: Vec<u64>,
}

/// Outcome of a sparse push.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparsePushSummary {
    /// Shards that applied their rows now or accepted them for their sync step.
    pub accepted: usize,
    /// Shards that dropped them as late gradients for a completed sync step.
    pub dropped_stale: usize,
    /// Staleness of every applied async / bounded part.
    pub staleness: Vec<u64>,
    /// Unique ids sent (after summing repeated ones).
    pub unique_ids: usize,
}

/// A batch's unique ids grouped by shard.
struct Split {
    /// For every position of the batch, where its id's row is: (shard, index in that
    /// shard's ids).
    at: Vec<(u32, u32)>,
    /// For every position of the batch, its id's number among the unique ids.
    first: Vec<u32>,
    /// For every unique id (in order of first appearance), where its row is.
    place: Vec<(u32, u32)>,
    /// Unique ids of the batch.
    unique: usize,
    /// Per shard, its unique ids in order of first appearance.
    shards: Vec<Vec<u64>>,
}

fn split(ids: &[u64], num_shards: usize) -> Split {
    let (mut unique, mut first) = (Vec::new(), Vec::new());
    UniqueIds::default().number(ids, &mut unique, &mut first);
    let mut shards = vec![Vec::new(); num_shards];
    let place: Vec<(u32, u32)> = unique
        .iter()
        .map(|&id| {
            let s = shard_of_id(id, num_shards);
            shards[s].push(id);
            (s as u32, (shards[s].len() - 1) as u32)
        })
        .collect();
    Split { at: first.iter().map(|&k| place[k as usize]).collect(), first, place, unique: unique.len(), shards }
}

/// Each shard's gradient rows as `wire` bytes, in the order of its ids: an id's row is the
/// sum of its rows in the batch, in the order they appear (the first copied, the others
/// added), encoded once. A row of an id that appears once goes straight from `grads` to
/// the wire.
fn wire_rows(plan: &Split, grads: &[f32], dim: usize, wire: DType) -> Vec<Vec<u8>> {
    // The batch's positions grouped by unique id, each group in order (a counting sort).
    let n = plan.place.len();
    let mut start = vec![0usize; n + 1];
    for &k in &plan.first {
        start[k as usize + 1] += 1;
    }
    for k in 0..n {
        start[k + 1] += start[k];
    }
    let mut next = start.clone();
    let mut order = vec![0u32; plan.first.len()];
    for (p, &k) in plan.first.iter().enumerate() {
        order[next[k as usize]] = p as u32;
        next[k as usize] += 1;
    }
    let row_bytes = dim * wire.size();
    let mut out: Vec<Vec<u8>> = plan.shards.iter().map(|s| Vec::with_capacity(s.len() * row_bytes)).collect();
    let mut sum = vec![0f32; dim];
    let row = |p: u32| &grads[p as usize * dim..(p as usize + 1) * dim];
    for k in 0..n {
        // Unique ids come in order of first appearance, and so do each shard's: this row
        // goes at the end of its shard's bytes.
        let bytes = &mut out[plan.place[k].0 as usize];
        let at = bytes.len();
        bytes.resize(at + row_bytes, 0);
        match &order[start[k]..start[k + 1]] {
            [p] => parasync_tensor::encode_f32_into(row(*p), wire, &mut bytes[at..]),
            [p, rest @ ..] => {
                sum.copy_from_slice(row(*p));
                for &q in rest {
                    sum.iter_mut().zip(row(q)).for_each(|(s, &x)| *s += x);
                }
                parasync_tensor::encode_f32_into(&sum, wire, &mut bytes[at..]);
            }
            [] => unreachable!("every unique id appears"),
        }
    }
    out
}

/// Bytes of rows one gRPC lookup request asks a shard for at most: a larger part of a lookup
/// goes as several requests (well under the shards' default `--max-message-bytes` of 16 MiB).
pub const GRPC_LOOKUP_BYTES: usize = 4 << 20;

/// Room for a gRPC push request's fields besides its ids and rows (the table name apart).
const PUSH_OVERHEAD: usize = 256;

fn id_bytes(ids: &[u64]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

impl Client {
    /// Creates `spec`'s table on every shard (idempotent: every worker may call it with the
    /// same spec; a different spec under the same name is `AlreadyExists`).
    pub async fn register_table(&self, spec: &TableSpec) -> Result<()> {
        names::check_name(&spec.name, names::MAX_NAME_BYTES)
            .map_err(|reason| Error::usage(format!("table {}: {reason}", Quoted(&spec.name))))?;
        if spec.dim == 0 {
            return Err(Error::usage(format!("table {}: dim must be at least 1", Quoted(&spec.name))));
        }
        let req = spec.to_proto()?;
        try_join_all(self.shards.iter().enumerate().map(|(i, s)| {
            let req = req.clone();
            async move {
                s.rpc()
                    .register_table(req)
                    .await
                    .map_err(|e| Error::from_status(e, &format!("register table {} on shard {i} ({})", Quoted(&spec.name), s.addr)))
            }
        }))
        .await?;
        self.tables
            .lock()
            .expect("tables lock")
            .insert(spec.name.clone(), KnownTable { dim: spec.dim, versions: vec![0; self.shards.len()] });
        Ok(())
    }

    /// The row width of a table this client registered (or `out_len / ids`).
    /// The row width of `table`: the one this client registered, or else `values / ids`
    /// (remembered from then on, with the versions the lookups see). An empty batch needs
    /// none (a sync worker pushes every step, with or without ids): it gets 1 when the table
    /// is unknown.
    fn table_dim(&self, table: &str, ids: usize, values: usize, what: &str) -> Result<usize> {
        let mut known = self.tables.lock().expect("tables lock");
        let dim = match known.get(table).map(|t| t.dim) {
            Some(d) => d,
            None if ids == 0 && values == 0 => return Ok(1),
            None if ids > 0 && values > 0 && values % ids == 0 => {
                let dim = values / ids;
                known.insert(table.to_string(), KnownTable { dim, versions: vec![0; self.shards.len()] });
                dim
            }
            None => return Err(Error::usage(format!("{what} {}: {values} values do not split into {ids} rows", Quoted(table)))),
        };
        if values != ids * dim {
            return Err(Error::usage(format!(
                "{what} {}: {ids} ids of {dim} elements need {} values, got {values}",
                Quoted(table),
                ids * dim
            )));
        }
        Ok(dim)
    }

    /// Writes the rows of `ids` (for `step`: sync waits for it, bounded gates on the slowest
    /// worker) into `out` (`ids.len() * dim`, row after row). Returns the lowest version of
    /// the shards asked. Over gRPC a shard's part goes as several requests when its rows
    /// exceed [`GRPC_LOOKUP_BYTES`].
    pub async fn lookup(&self, table: &str, ids: &[u64], step: u64, out: &mut [f32]) -> Result<u64> {
        let dim = self.table_dim(table, ids.len(), out.len(), "lookup in table")?;
        if ids.is_empty() {
            return Ok(0);
        }
        let plan = split(ids, self.shards.len());
        let wire = self.pull_wire();
        let got = try_join_all(plan.shards.iter().enumerate().filter(|(_, s)| !s.is_empty()).map(|(i, shard_ids)| async move {
            let shard = &self.shards[i];
            let ctx = format!("lookup of {} ids in table {} for step {step} on shard {i} ({})", shard_ids.len(), Quoted(table), shard.addr);
            let mut req = ps::LookupRequest {
                table: table.to_string(),
                worker_id: self.opts.worker_id,
                step,
                ids: Default::default(),
                num_ids: shard_ids.len() as u64,
                wire_dtype: dtype_to_proto(wire),
                timeout_ms: self.pull_timeout_ms(),
            };
            let (version, rows) = match &shard.data {
                Some(data) => {
                    let (version, rows) = data.lookup(req, shard_ids, wire, dim, &ctx).await?;
                    (version, bytes::Bytes::from(rows))
                }
                None => {
                    // Parts whose rows stay under GRPC_LOOKUP_BYTES, one after the other (the
                    // lowest version of the parts stands for the shard's).
                    let row_bytes = dim * wire.size();
                    let per = (GRPC_LOOKUP_BYTES / row_bytes.max(8)).max(1);
                    let mut lowest = u64::MAX;
                    let mut rows = Vec::with_capacity(shard_ids.len() * row_bytes);
                    for part in shard_ids.chunks(per) {
                        req.ids = id_bytes(part).into();
                        req.num_ids = part.len() as u64;
                        let r = shard.rpc().lookup(req.clone()).await.map_err(|s| Error::from_status(s, &ctx))?.into_inner();
                        if r.wire_dtype != dtype_to_proto(wire) {
                            return Err(Error::new(crate::ErrorKind::Internal, format!("{ctx}: {}", crate::dataplane::wrong_wire(r.wire_dtype, wire))));
                        }
                        if r.rows.len() != part.len() * row_bytes {
                            let n = r.rows.len();
                            return Err(Error::new(crate::ErrorKind::Internal, format!("{ctx}: {n} row bytes for {} ids of {dim} {wire}", part.len())));
                        }
                        rows.extend_from_slice(&r.rows);
                        lowest = lowest.min(r.version);
                    }
                    (lowest, bytes::Bytes::from(rows))
                }
            };
            Ok::<_, Error>((i, version, rows))
        }))
        .await?;
        // Each position of the batch gets its row from its shard's answer, decoded there.
        let mut by_shard: Vec<&[u8]> = vec![&[]; self.shards.len()];
        let mut lowest = u64::MAX;
        {
            let mut known = self.tables.lock().expect("tables lock");
            for (i, version, rows) in &got {
                lowest = lowest.min(*version);
                by_shard[*i] = rows;
                if let Some(t) = known.get_mut(table) {
                    t.versions[*i] = *version;
                }
            }
        }
        let row_bytes = dim * wire.size();
        for (row, &(s, j)) in out.chunks_exact_mut(dim).zip(&plan.at) {
            let j = j as usize;
            parasync_tensor::decode_into(&by_shard[s as usize][j * row_bytes..(j + 1) * row_bytes], wire, row)
                .expect("rows of the announced size");
        }
        Ok(lowest)
    }

    /// Pushes one gradient row per id (`grads`: `ids.len() * dim`) for `step`. Rows of
    /// repeated ids are summed (in the order they appear) before they are sent; each shard
    /// gets its ids in one request (over gRPC, a shard's part past the client's request limit
    /// is a usage error before anything is sent: the data plane takes any size). In sync mode every worker pushes every step to every
    /// shard, with or without ids for it: a shard completes a step when all workers' pushes
    /// arrived. Time-based checkpoints work as for dense pushes: a step a shard's reply
    /// names is passed on in this worker's pushes of the steps up to it.
    pub async fn push_sparse(&self, table: &str, ids: &[u64], grads: &[f32], step: u64) -> Result<SparsePushSummary> {
        let dim = self.table_dim(table, ids.len(), grads.len(), "push to table")?;
        let plan = split(ids, self.shards.len());
        let wire = self.opts.wire_dtype;
        // Each shard's rows, with the rows of repeated ids summed in the order they appear.
        let rows = wire_rows(&plan, grads, dim, wire);
        let bases: Vec<u64> = {
            let known = self.tables.lock().expect("tables lock");
            known.get(table).map_or_else(|| vec![0; self.shards.len()], |t| t.versions.clone())
        };
        // A push is one request per shard (sync counts one per worker and step): over gRPC,
        // one past the request limit fails here, before any shard gets its part.
        let limit = crate::client::grpc_request_limit(&self.opts);
        for (i, shard_ids) in plan.shards.iter().enumerate() {
            let bytes = shard_ids.len() * (8 + dim * wire.size()) + table.len() + PUSH_OVERHEAD;
            if self.shards[i].data.is_none() && bytes > limit {
                return Err(Error::usage(format!(
                    "push to table {} for step {step}: shard {i}'s part ({} ids of {dim} {} elements) makes a gRPC \
                     request of {bytes} bytes, past this client's limit of {limit} bytes; nothing was sent. Push fewer \
                     ids per call, or use the shards' data plane (ClientOptions::data_plane), which takes pushes of any size",
                    Quoted(table),
                    shard_ids.len(),
                    wire.name(),
                )));
            }
        }
        // A time-based checkpoint step a shard named, passed on to every shard.
        let checkpoint_step = self.checkpoint_step_for(step);
        let replies = try_join_all(plan.shards.iter().zip(rows).enumerate().map(|(i, (shard_ids, rows))| {
            let bases = &bases;
            async move {
                let shard = &self.shards[i];
                let ctx = format!("push of {} rows to table {} for step {step} to shard {i} ({})", shard_ids.len(), Quoted(table), shard.addr);
                let mut req = ps::PushSparseRequest {
                    table: table.to_string(),
                    worker_id: self.opts.worker_id,
                    step,
                    base_version: bases[i],
                    ids: Default::default(),
                    rows: Default::default(),
                    num_ids: shard_ids.len() as u64,
                    wire_dtype: dtype_to_proto(wire),
                    checkpoint_step,
                };
                match &shard.data {
                    Some(data) => data.push_sparse(req, shard_ids, &rows, &ctx).await,
                    None => {
                        req.ids = id_bytes(shard_ids).into();
                        req.rows = rows.into();
                        Ok(shard.rpc().push_sparse(req).await.map_err(|s| Error::from_status(s, &ctx))?.into_inner())
                    }
                }
            }
        }))
        .await?;
        let mut summary = SparsePushSummary { unique_ids: plan.unique, ..Default::default() };
        for r in replies {
            self.note_reply(&r);
            if r.accepted {
                summary.accepted += 1;
                summary.staleness.push(r.staleness);
            }
            summary.dropped_stale += usize::from(r.dropped_stale);
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_into_unique_ids_per_shard() {
        let ids = [7, 3, 7, 9, 3, 3, 11];
        let p = split(&ids, 3);
        assert_eq!(p.unique, 4);
        let mut seen: Vec<u64> = p.shards.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, [3, 7, 9, 11]);
        for (s, shard_ids) in p.shards.iter().enumerate() {
            assert!(shard_ids.iter().all(|&id| shard_of_id(id, 3) == s));
        }
        // Every position points at its id's place, repeated ids at the same place.
        for (pos, &(s, j)) in p.at.iter().enumerate() {
            assert_eq!(p.shards[s as usize][j as usize], ids[pos]);
        }
        assert_eq!(p.at[0], p.at[2]);
        assert_eq!(p.at[1], p.at[4]);
    }

    #[test]
    fn pushed_rows_are_summed_in_batch_order_and_encoded_once() {
        let ids = [7, 3, 7, 9, 3, 3, 11];
        // Rows of 2: position p holds (p + 0.25, -p).
        let grads: Vec<f32> = (0..ids.len()).flat_map(|p| [p as f32 + 0.25, -(p as f32)]).collect();
        let p = split(&ids, 2);
        for wire in [DType::F32, DType::Bf16] {
            let rows = wire_rows(&p, &grads, 2, wire);
            for (s, shard_ids) in p.shards.iter().enumerate() {
                let got = parasync_tensor::decode_vec(&rows[s], wire).unwrap();
                assert_eq!(got.len(), shard_ids.len() * 2);
                for (j, id) in shard_ids.iter().enumerate() {
                    // The sum of the id's rows from 0.0 upwards, in batch order.
                    let mut want = [None::<f32>; 2];
                    for (pos, _) in ids.iter().enumerate().filter(|(_, &x)| x == *id) {
                        for (e, w) in want.iter_mut().enumerate() {
                            let x = grads[pos * 2 + e];
                            *w = Some(w.map_or(x, |s| s + x));
                        }
                    }
                    let want: Vec<f32> = want.iter().map(|w| {
                        let w = w.unwrap();
                        if wire == DType::Bf16 { parasync_tensor::bf16::to_f32(parasync_tensor::bf16::from_f32_rne(w)) } else { w }
                    }).collect();
                    assert_eq!(&got[j * 2..j * 2 + 2], &want[..], "id {id} over {wire:?}");
                }
            }
        }
    }
}
