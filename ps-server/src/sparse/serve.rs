//! The table calls of the service — register, lookup, push — shared by gRPC and the data
//! plane: requests in, checked, carried out on the shard's tables, replies out.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use parasync_proto::ps;
use tonic::Status;

use crate::convert;
use crate::error::Error;
use crate::service::PsService;
use crate::store::PushMeta;

/// Most row bytes one lookup returns (its ids arrive in far fewer bytes than the rows they
/// ask for: without a bound, one small request could make the shard allocate any amount).
const MAX_LOOKUP_BYTES: usize = 256 << 20;

/// Lookups and pushes of at least this many values run on the blocking pool.
const BLOCKING_ROW_VALUES: usize = 1 << 18;

/// Ids from their little-endian bytes; `expected` is the count a data-plane message
/// announced (`None` over gRPC, where the bytes carry it).
pub(crate) fn decode_ids(bytes: &[u8], expected: Option<u64>, table: &str) -> Result<Vec<u64>, Error> {
    if bytes.len() % 8 != 0 {
        return Err(Error::invalid(table, format!("ids take 8 bytes each (little-endian u64), got {} bytes", bytes.len())));
    }
    let n = bytes.len() / 8;
    if let Some(e) = expected {
        if e != n as u64 {
            return Err(Error::invalid(table, format!("num_ids says {e}, the payload holds {n} ids")));
        }
    }
    Ok(bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
}

impl PsService {
    /// Creates a table or confirms an identical one.
    pub(crate) fn register_table(&self, r: ps::RegisterTableRequest) -> Result<ps::RegisterTableResponse, Status> {
        let def = convert::register_table_request(r).map_err(|e| self.reject(e))?;
        let created = self.store().register_table(def).map_err(|e| self.reject(e))?;
        Ok(ps::RegisterTableResponse { created })
    }

    /// Rows of `ids` once the request's step allows, written straight in its wire dtype.
    pub(crate) async fn lookup_rows(&self, r: &ps::LookupRequest, ids: Vec<u64>) -> Result<(ps::LookupResponse, bytes::Bytes), Status> {
        let table = self.store().tables().get(&r.table).map_err(|e| self.reject(e))?;
        let wire = convert::dtype(r.wire_dtype, "wire_dtype", &r.table).map_err(|e| self.reject(e))?;
        let n = ids.len().saturating_mul(table.dim());
        if n.saturating_mul(wire.size()) > MAX_LOOKUP_BYTES {
            return Err(self.reject(Error::ResourceExhausted {
                variable: r.table.clone(),
                reason: format!(
                    "a lookup of {} ids of {} elements would return {} bytes; at most {MAX_LOOKUP_BYTES} are sent at once: look up fewer ids at a time",
                    ids.len(),
                    table.dim(),
                    n.saturating_mul(wire.size())
                ),
            }));
        }
        let timeout = self.pull_timeout(r.timeout_ms);
        let wait = table.wait_readable(r.step, timeout);
        let version = self.unless_shutdown(wait).await.map_err(|e| self.reject(e))?;
        let work = {
            let table = Arc::clone(&table);
            move || {
                let mut out = vec![0u8; n * wire.size()];
                table.lookup_wire(&ids, wire, &mut out);
                bytes::Bytes::from(out)
            }
        };
        let out = if n >= BLOCKING_ROW_VALUES {
            tokio::task::spawn_blocking(work).await.map_err(|e| Status::internal(format!("lookup task failed: {e}")))?
        } else {
            work()
        };
        table.traffic.bytes_out.fetch_add(out.len() as u64, Relaxed);
        self.store().metrics().bytes_out.fetch_add(out.len() as u64, Relaxed);
        let reply = ps::LookupResponse { version, wire_dtype: convert::dtype_to_proto(wire), rows: Default::default() };
        Ok((reply, out))
    }

    /// Applies a push of gradient rows (`rows` in the request's wire dtype). Checkpoints
    /// take part as in a push of a variable: a checkpoint step the worker passes on is
    /// taken before the rows are applied (they may complete that step), the first push of
    /// an async / bounded checkpoint step takes the shard's state first, and the reply
    /// names the step of a time-based checkpoint this shard is due for.
    pub(crate) async fn push_rows(&self, r: &ps::PushSparseRequest, ids: Vec<u64>, rows: &[u8]) -> Result<ps::PushResponse, Status> {
        let tables = self.store().tables();
        let table = tables.get(&r.table).map_err(|e| self.reject(e))?;
        let wire = convert::dtype(r.wire_dtype, "wire_dtype", &r.table).map_err(|e| self.reject(e))?;
        let values = parasync_tensor::decode_vec(rows, wire)
            .map_err(|e| self.reject(Error::invalid(&r.table, format!("rows: {e}"))))?;
        let n = values.len();
        let grad = tables.gradient(&table, ids, values).map_err(|e| self.reject(e))?;
        table.traffic.bytes_in.fetch_add(rows.len() as u64, Relaxed);
        self.store().metrics().bytes_in.fetch_add(rows.len() as u64, Relaxed);
        let meta = PushMeta { worker: r.worker_id, step: r.step, base_version: r.base_version };
        let checkpointer = self.store().checkpointer().cloned();
        if let (Some(c), true) = (&checkpointer, r.checkpoint_step > 0) {
            // Before this push is applied: it may be the one that completes that step.
            c.passed_on(self.store(), r.checkpoint_step);
        }
        let work = {
            let table = Arc::clone(&table);
            let store = Arc::clone(self.store());
            let checkpointer = checkpointer.clone();
            move || {
                if let Some(c) = &checkpointer {
                    c.before_table_push(&store, meta.step);
                }
                table.push(meta, grad)
            }
        };
        let result = if n >= BLOCKING_ROW_VALUES {
            tokio::task::spawn_blocking(work).await.map_err(|e| Status::internal(format!("update task failed: {e}")))?
        } else {
            work()
        };
        let r = result.map_err(|e| self.reject(e))?;
        if r.dropped_stale {
            self.store().metrics().dropped_stale.fetch_add(1, Relaxed);
        }
        Ok(ps::PushResponse {
            accepted: r.accepted,
            dropped_stale: r.dropped_stale,
            version: r.version,
            staleness: r.staleness,
            duplicate: false,
            checkpoint_due: checkpointer.map_or(0, |c| c.on_push(meta.step)),
        })
    }

    /// What `ServerInfo` says of each table.
    pub(crate) fn table_infos(&self) -> Vec<ps::TableInfo> {
        self.store()
            .tables()
            .list()
            .iter()
            .map(|t| {
                let s = t.status();
                ps::TableInfo {
                    name: t.def.name.clone(),
                    dim: t.def.dim,
                    storage_dtype: convert::dtype_to_proto(t.def.dtype),
                    optimizer: t.def.optimizer.name().into(),
                    learning_rate: s.learning_rate,
                    version: s.version,
                    rows: s.rows,
                    capacity: t.def.capacity,
                    eviction: t.def.eviction.name().into(),
                    admitted: s.counts.admitted,
                    evicted: s.counts.evicted,
                    dropped: s.counts.dropped,
                    lookups: t.traffic.lookups.load(Relaxed),
                    rows_looked_up: t.traffic.rows_looked_up.load(Relaxed),
                    rows_pushed: t.traffic.rows_pushed.load(Relaxed),
                }
            })
            .collect()
    }
}
