//! The `parasync.ps.v1.ParameterServer` gRPC service: thin adapters from requests to the
//! [`VariableStore`].

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use parasync_proto::ps::{self, parameter_server_server::ParameterServer};
use parasync_tensor::DType;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::consistency::Mode;
use crate::convert;
use crate::error::Error;
use crate::store::{GradientBuffer, PushMeta, ValuesSnapshot, Variable, VariableStore};

/// Variables at least this large are updated on the blocking pool, off the I/O threads.
const BLOCKING_APPLY_ELEMENTS: usize = 1 << 18;

/// A push checked against its variable, waiting for its values.
pub(crate) struct PendingPush {
    pub(crate) var: Arc<Variable>,
    pub(crate) wire: DType,
    /// Wire dtype of the values a push_pull sends back.
    pub(crate) pull_wire: DType,
    kind: ps::PushKind,
    meta: PushMeta,
    /// Which push of which client this is (a retry carries the same).
    id: Option<crate::store::PushId>,
    /// A time-based checkpoint step the worker passes on (0: none).
    checkpoint_step: u64,
}

/// Settings of the service that are not part of the store.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Index of this shard (for info and metrics).
    pub shard_index: u32,
    /// How long a pull may wait for its step when the request does not say.
    pub default_pull_timeout: Duration,
    /// Largest data slice per streamed pull message, in bytes.
    pub chunk_bytes: usize,
    /// Port of the data plane beside this service (0: none), announced in server info.
    pub data_port: u16,
    /// The step of the checkpoint the shard started from, if it was restored.
    pub restored_step: Option<u64>,
}

/// The service: shared store plus settings and the shutdown signal.
#[derive(Clone)]
pub struct PsService {
    store: Arc<VariableStore>,
    config: ServiceConfig,
    /// Turns true when the server begins to shut down, releasing waiting pulls.
    shutdown: watch::Receiver<bool>,
    /// Chunk buffers of pull streams.
    pool: parasync_tensor::BufferPool,
    /// Drawn at start (see `ServerInfoResponse.incarnation`).
    incarnation: u64,
}

impl PsService {
    /// A service over `store`; pulls waiting for a step end when `shutdown` turns true.
    pub fn new(store: Arc<VariableStore>, config: ServiceConfig, shutdown: watch::Receiver<bool>) -> Self {
        PsService { store, config, shutdown, pool: Default::default(), incarnation: rand::random::<u64>() | 1 }
    }

    /// The store this service serves.
    pub(crate) fn store(&self) -> &Arc<VariableStore> {
        &self.store
    }

    /// Counts and converts a refused request.
    pub(crate) fn reject(&self, e: Error) -> Status {
        self.store.metrics().rejected.fetch_add(1, Relaxed);
        tracing::debug!(error = %e, "request rejected");
        e.into()
    }

    /// A failed read of a push stream. tonic refuses a message over the size limit with
    /// `out_of_range`; that becomes `resource_exhausted` (the gRPC convention), naming the
    /// variable when the header has been read, and what to change.
    fn stream_failed(&self, status: Status, variable: Option<&str>) -> Status {
        if !parasync_proto::codec::is_oversized_message(&status) {
            return status;
        }
        self.store.metrics().rejected.fetch_add(1, Relaxed);
        let what = variable.map_or_else(|| "the first message of a push".to_string(), |v| format!("a chunk of a push to {v:?}"));
        Status::resource_exhausted(format!(
            "{what} is larger than this server accepts ({}); send smaller chunks (the client's chunk_bytes) \
             or raise the server's --max-message-bytes",
            status.message()
        ))
    }

    /// Receives and applies one push; returns its reply with the variable, the wire dtype
    /// of values sent back, the step and the requested pull timeout (push_pull).
    async fn push_inner(
        &self,
        mut stream: Streaming<ps::PushRequest>,
    ) -> Result<(ps::PushResponse, Arc<Variable>, DType, (u64, u32)), Status> {
        let first = stream
            .message()
            .await
            .map_err(|s| self.stream_failed(s, None))?
            .ok_or_else(|| Status::invalid_argument("empty push stream: the first message must carry a header"))?;
        let header = first
            .header
            .ok_or_else(|| Status::invalid_argument("the first message of a push must carry a header"))?;
        let (pending, mut buf) = self.begin_push(&header)?;
        let metrics = self.store.metrics();
        metrics.bytes_in.fetch_add(first.data.len() as u64, Relaxed);
        buf.append(&first.data).map_err(|e| self.reject(e))?;
        while let Some(msg) = stream.message().await.map_err(|s| self.stream_failed(s, Some(&header.variable)))? {
            if msg.header.is_some() {
                return Err(self.reject(Error::invalid(&header.variable, "a push carries its header in the first message only")));
            }
            metrics.bytes_in.fetch_add(msg.data.len() as u64, Relaxed);
            buf.append(&msg.data).map_err(|e| self.reject(e))?;
        }
        let reply = self.complete_push(&pending, buf).await?;
        Ok((reply, pending.var, pending.pull_wire, (header.step, header.pull_timeout_ms)))
    }

    /// Checks a push header against its variable: the push it describes and the buffer
    /// its values go into.
    pub(crate) fn begin_push(&self, header: &ps::PushHeader) -> Result<(PendingPush, GradientBuffer), Status> {
        let var = self.store.get(&header.variable).map_err(|e| self.reject(e))?;
        let wire = convert::dtype(header.wire_dtype, "wire_dtype", &header.variable).map_err(|e| self.reject(e))?;
        let kind = ps::PushKind::try_from(header.kind).map_err(|_| {
            self.reject(Error::invalid(&header.variable, format!("unknown push kind {}", header.kind)))
        })?;
        let check_finite = !self.store.config().allow_non_finite && kind == ps::PushKind::Gradient;
        let buf = GradientBuffer::new(&var, wire, header.num_elements, check_finite).map_err(|e| self.reject(e))?;
        let meta = PushMeta { worker: header.worker_id, step: header.step, base_version: header.base_version };
        let id = (header.client_incarnation != 0)
            .then_some(crate::store::PushId { incarnation: header.client_incarnation, sequence: header.sequence });
        let pull_wire = match header.pull_wire_dtype {
            0 => wire,
            d => convert::dtype(d, "pull_wire_dtype", &header.variable).map_err(|e| self.reject(e))?,
        };
        Ok((PendingPush { var, wire, pull_wire, kind, meta, id, checkpoint_step: header.checkpoint_step }, buf))
    }

    /// Applies a push whose values all arrived (large updates on the blocking pool).
    pub(crate) async fn complete_push(&self, pending: &PendingPush, buf: GradientBuffer) -> Result<ps::PushResponse, Status> {
        let values = buf.finish().map_err(|e| self.reject(e))?;
        let n = values.len();
        let store = Arc::clone(&self.store);
        let target = Arc::clone(&pending.var);
        let (kind, meta, id) = (pending.kind, pending.meta, pending.id);
        let checkpointer = self.store.checkpointer();
        if let (Some(c), true) = (checkpointer, pending.checkpoint_step > 0 && kind == ps::PushKind::Gradient) {
            // Before this push is applied: it may be the one that completes that step.
            c.passed_on(&self.store, pending.checkpoint_step);
        }
        let run = move || match kind {
            ps::PushKind::Gradient => store.push_gradient_once(&target, meta, id, values),
            ps::PushKind::Assign => store.assign(&target, values.into_f32()).map(|(version, taken)| crate::store::PushResult {
                accepted: taken,
                dropped_stale: false,
                version,
                staleness: 0,
                duplicate: false,
            }),
        };
        let result = if n >= BLOCKING_APPLY_ELEMENTS {
            tokio::task::spawn_blocking(run).await.map_err(|e| Status::internal(format!("update task failed: {e}")))?
        } else {
            run()
        };
        let r = result.map_err(|e| self.reject(e))?;
        Ok(ps::PushResponse {
            accepted: r.accepted,
            dropped_stale: r.dropped_stale,
            version: r.version,
            staleness: r.staleness,
            duplicate: r.duplicate,
            checkpoint_due: checkpointer.map_or(0, |c| c.on_push(meta.step)),
        })
    }

    /// The variable's current values as a stream of (header on the first, data) chunks.
    fn value_chunks(
        &self,
        var: Arc<Variable>,
        wire: DType,
    ) -> impl Stream<Item = (Option<ps::PullHeader>, bytes::Bytes)> + Send + 'static {
        let metrics = Arc::clone(self.store.metrics());
        metrics.pulls.fetch_add(1, Relaxed);
        let chunk = (self.config.chunk_bytes / wire.size()).max(1);
        let pool = self.pool.clone();
        // Every chunk comes from the values of one version, taken with the first.
        futures::stream::unfold((var, 0usize, None), move |(var, start, snap): (Arc<Variable>, usize, Option<ValuesSnapshot>)| {
            let metrics = Arc::clone(&metrics);
            let pool = pool.clone();
            async move {
                let first = snap.is_none();
                if start >= var.len() && !first {
                    return None;
                }
                let snap = match snap {
                    Some(s) => s,
                    None => var.values_snapshot().await,
                };
                let end = (start + chunk).min(var.len());
                let mut buf = pool.take((end - start) * wire.size());
                snap.encode_range(start, end, wire, &mut buf);
                metrics.bytes_out.fetch_add(buf.len() as u64, Relaxed);
                let header = first.then(|| pull_header(&var, snap.version(), wire));
                Some(((header, pool.freeze(buf)), (var, end, Some(snap))))
            }
        })
    }

    /// The status of a push_pull whose pull failed after its push: it says whether the push
    /// went through, or a caller might push the same gradient again.
    pub(crate) fn pull_after_push_failed(&self, push: &ps::PushResponse, e: Error) -> Status {
        let s = self.reject(e);
        if !push.accepted {
            return s;
        }
        let why = format!("the push was accepted (server version {}), then the pull failed: {}", push.version, s.message());
        Status::new(s.code(), why)
    }

    /// How long a pull asking for `timeout_ms` (0: the server default) may wait.
    pub(crate) fn pull_timeout(&self, timeout_ms: u32) -> Duration {
        match timeout_ms {
            0 => self.config.default_pull_timeout,
            ms => Duration::from_millis(ms as u64),
        }
    }

    pub(crate) async fn wait_for_step(&self, var: &Variable, step: u64, timeout: Duration) -> Result<(), Error> {
        self.unless_shutdown(self.store.wait_readable(var, step, timeout)).await
    }

    /// `wait`'s result, or `ShuttingDown` as soon as the server begins to shut down.
    pub(crate) async fn unless_shutdown<T>(&self, wait: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, Error> {
        let mut shutdown = self.shutdown.clone();
        let shutting_down = async move {
            if shutdown.wait_for(|&s| s).await.is_err() {
                // No one can signal shutdown any more: wait only for the step.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            r = wait => r,
            _ = shutting_down => Err(Error::ShuttingDown),
        }
    }
}

/// Stream of pull chunks.
pub type PullStream = Pin<Box<dyn Stream<Item = Result<ps::PullResponse, Status>> + Send>>;
/// Stream of push-pull reply chunks.
pub type PushPullStream = Pin<Box<dyn Stream<Item = Result<ps::PushPullResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ParameterServer for PsService {
    async fn register(&self, request: Request<ps::RegisterRequest>) -> Result<Response<ps::RegisterResponse>, Status> {
        let (def, init) = convert::register_request(request.into_inner()).map_err(|e| self.reject(e))?;
        let name = def.name.clone();
        let store = Arc::clone(&self.store);
        let r = tokio::task::spawn_blocking(move || store.register_full(def, &init))
            .await
            .map_err(|e| Status::internal(format!("registration task failed: {e}")))?
            .map_err(|e| self.reject(e))?;
        if r.created {
            tracing::info!(variable = %name, "registered");
        }
        Ok(Response::new(ps::RegisterResponse { created: r.created, version: r.version, awaiting_values: r.awaiting_values }))
    }

    async fn push(&self, request: Request<Streaming<ps::PushRequest>>) -> Result<Response<ps::PushResponse>, Status> {
        self.push_inner(request.into_inner()).await.map(|(reply, ..)| Response::new(reply))
    }

    type PushPullStream = PushPullStream;

    async fn push_pull(
        &self,
        request: Request<Streaming<ps::PushRequest>>,
    ) -> Result<Response<Self::PushPullStream>, Status> {
        let (reply, var, wire, (step, timeout_ms)) = self.push_inner(request.into_inner()).await?;
        // The values for the worker's next step: sync waits for this step to complete.
        let timeout = self.pull_timeout(timeout_ms);
        if let Err(e) = self.wait_for_step(&var, step.saturating_add(1), timeout).await {
            return Err(self.pull_after_push_failed(&reply, e));
        }
        let mut reply = Some(reply);
        let stream = tokio_stream::StreamExt::map(self.value_chunks(var, wire), move |(header, data)| {
            Ok(ps::PushPullResponse { push: reply.take(), header, data })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type PullStream = PullStream;

    async fn pull(&self, request: Request<ps::PullRequest>) -> Result<Response<Self::PullStream>, Status> {
        let r = request.into_inner();
        let var = self.store.get(&r.variable).map_err(|e| self.reject(e))?;
        let wire = convert::dtype(r.wire_dtype, "wire_dtype", &r.variable).map_err(|e| self.reject(e))?;
        self.wait_for_step(&var, r.step, self.pull_timeout(r.timeout_ms)).await.map_err(|e| self.reject(e))?;
        let stream = tokio_stream::StreamExt::map(self.value_chunks(var, wire), |(header, data)| {
            Ok(ps::PullResponse { header, data })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn set_learning_rate(
        &self,
        request: Request<ps::SetLearningRateRequest>,
    ) -> Result<Response<ps::SetLearningRateResponse>, Status> {
        let r = request.into_inner();
        let target = match (r.all_variables, r.variable.is_empty()) {
            (true, true) => None,
            (false, false) => Some(r.variable),
            (true, false) => {
                return Err(self.reject(Error::invalid(&r.variable, "name a variable or set all_variables, not both")));
            }
            (false, true) => {
                return Err(self.reject(Error::invalid("", "name a variable, or set all_variables to change every variable")));
            }
        };
        let Some(lr) = r.learning_rate else {
            return Err(self.reject(Error::invalid(target.as_deref().unwrap_or("*"), "learning_rate is required")));
        };
        // The update takes each variable's write lock, which a long update may hold: off
        // the runtime threads.
        let store = self.store.clone();
        let name = target.clone();
        let updated = tokio::task::spawn_blocking(move || store.set_learning_rate(name.as_deref(), lr))
            .await
            .map_err(|e| Status::internal(format!("setting the learning rate failed: {e}")))?
            .map_err(|e| self.reject(e))?;
        tracing::info!(variable = target.as_deref().unwrap_or("*"), lr, updated, "learning rate changed");
        Ok(Response::new(ps::SetLearningRateResponse { updated }))
    }

    async fn server_info(&self, _: Request<ps::ServerInfoRequest>) -> Result<Response<ps::ServerInfoResponse>, Status> {
        let mode = self.store.config().mode;
        let (k, s) = match mode {
            Mode::Sync { replicas_to_aggregate, .. } => (replicas_to_aggregate, 0),
            Mode::Bounded { max_staleness, .. } => (0, max_staleness),
            Mode::Async { .. } => (0, 0),
        };
        let mut variables = Vec::new();
        for v in self.store.list() {
            let (version, worker_clocks, learning_rate) = v.version_clocks_and_rate().await;
            variables.push(ps::VariableInfo {
                name: v.def().name.clone(),
                shape: v.def().shape.clone(),
                storage_dtype: convert::dtype_to_proto(v.def().dtype),
                version,
                worker_clocks,
                optimizer: v.def().optimizer.name().into(),
                learning_rate,
            });
        }
        Ok(Response::new(ps::ServerInfoResponse {
            mode: mode.name().into(),
            shard_index: self.config.shard_index,
            num_workers: mode.num_workers(),
            replicas_to_aggregate: k,
            max_staleness: s,
            variables,
            dropped_stale: self.store.metrics().dropped_stale.load(Relaxed),
            data_port: self.config.data_port.into(),
            restored_step: self.config.restored_step.unwrap_or(0),
            restored: self.config.restored_step.is_some(),
            checkpoints: self.store.checkpointer().is_some(),
            incarnation: self.incarnation,
            tables: self.table_infos(),
        }))
    }

    async fn register_table(&self, request: Request<ps::RegisterTableRequest>) -> Result<Response<ps::RegisterTableResponse>, Status> {
        PsService::register_table(self, request.into_inner()).map(Response::new)
    }

    async fn lookup(&self, request: Request<ps::LookupRequest>) -> Result<Response<ps::LookupResponse>, Status> {
        let r = request.into_inner();
        let ids = crate::sparse::serve::decode_ids(&r.ids, None, &r.table).map_err(|e| self.reject(e))?;
        let (mut reply, rows) = self.lookup_rows(&r, ids).await?;
        reply.rows = rows;
        Ok(Response::new(reply))
    }

    async fn push_sparse(&self, request: Request<ps::PushSparseRequest>) -> Result<Response<ps::PushResponse>, Status> {
        let r = request.into_inner();
        let ids = crate::sparse::serve::decode_ids(&r.ids, None, &r.table).map_err(|e| self.reject(e))?;
        self.push_rows(&r, ids, &r.rows).await.map(Response::new)
    }

    async fn checkpoint(&self, request: Request<ps::CheckpointRequest>) -> Result<Response<ps::CheckpointResponse>, Status> {
        let step = request.into_inner().step;
        let Some(c) = self.store.checkpointer() else {
            return Err(Status::failed_precondition(format!(
                "shard {} writes no checkpoints: start it with --checkpoint-dir",
                self.config.shard_index
            )));
        };
        let store = Arc::clone(&self.store);
        // Taking the variables' state waits for their locks: not on a runtime thread.
        let c2 = Arc::clone(c);
        let rx = tokio::task::spawn_blocking(move || c2.request(&store, step))
            .await
            .map_err(|e| Status::internal(format!("checkpoint request: {e}")))?;
        let mut shutdown = self.shutdown.clone();
        let outcome = tokio::select! {
            r = rx => r.map_err(|_| Status::internal("the checkpoint writer stopped"))?,
            _ = tokio::time::sleep(crate::checkpoint::REQUEST_TIMEOUT) => {
                return Err(Status::deadline_exceeded(format!("checkpoint of step {step}: the variables did not reach it in {:?}", crate::checkpoint::REQUEST_TIMEOUT)))
            }
            _ = shutdown.wait_for(|&s| s) => return Err(Status::unavailable("the shard is shutting down")),
        };
        let o = outcome.map_err(|e| Status::failed_precondition(format!("checkpoint of step {step} on shard {}: {e}", self.config.shard_index)))?;
        Ok(Response::new(ps::CheckpointResponse { step: o.step, path: o.path.display().to_string(), bytes: o.bytes, seconds: o.seconds }))
    }
}

pub(crate) fn pull_header(var: &Variable, version: u64, wire: DType) -> ps::PullHeader {
    ps::PullHeader { version, shape: var.def().shape.clone(), wire_dtype: convert::dtype_to_proto(wire) }
}

#[cfg(test)]
mod tests {
    //! The service called directly through its trait, without a transport.
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::StoreConfig;
    use futures::StreamExt;

    fn service(mode: Mode) -> PsService {
        let store = Arc::new(VariableStore::new(StoreConfig::new(mode), Arc::new(Metrics::default())));
        let config = ServiceConfig { shard_index: 3, default_pull_timeout: Duration::from_millis(50), chunk_bytes: 16, data_port: 0, restored_step: None };
        PsService::new(store, config, watch::channel(false).1)
    }

    fn register_req(name: &str, shape: &[u64], values: &[f32]) -> ps::RegisterRequest {
        let mut data = Vec::new();
        parasync_tensor::encode_f32(values, DType::F32, &mut data);
        ps::RegisterRequest {
            name: name.into(),
            shape: shape.to_vec(),
            storage_dtype: ps::Dtype::F32 as i32,
            optimizer: Some(ps::Optimizer { kind: Some(ps::optimizer::Kind::Sgd(ps::Sgd { learning_rate: 0.1, momentum: 0.0, nesterov: false })) }),
            init: Some(ps::Initializer { kind: Some(ps::initializer::Kind::Values(ps::TensorValues { dtype: ps::Dtype::F32 as i32, data: data.into() })) }),
            stochastic_rounding: false,
        }
    }

    #[tokio::test]
    async fn register_info_and_chunked_pull() {
        let svc = service(Mode::Sync { num_workers: 2, replicas_to_aggregate: 2 });
        let values: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let r = svc.register(Request::new(register_req("v", &[5, 2], &values))).await.unwrap().into_inner();
        assert!(r.created);
        let again = svc.register(Request::new(register_req("v", &[5, 2], &values))).await.unwrap().into_inner();
        assert!(!again.created);
        let err = svc.register(Request::new(register_req("v", &[2, 5], &values))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);

        let info = svc.server_info(Request::new(ps::ServerInfoRequest {})).await.unwrap().into_inner();
        assert_eq!((info.mode.as_str(), info.shard_index, info.num_workers, info.replicas_to_aggregate), ("sync", 3, 2, 2));
        assert_eq!(info.variables[0].shape, vec![5, 2]);

        // chunk_bytes 16 → 4 f32 per message: 3 messages, header on the first only
        let req = ps::PullRequest { variable: "v".into(), worker_id: 0, step: 0, wire_dtype: ps::Dtype::F32 as i32, timeout_ms: 0 };
        let msgs: Vec<ps::PullResponse> = svc.pull(Request::new(req)).await.unwrap().into_inner().map(|m| m.unwrap()).collect().await;
        assert_eq!(msgs.len(), 3);
        assert!(msgs[0].header.is_some() && msgs[1..].iter().all(|m| m.header.is_none()));
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| m.data.to_vec()).collect();
        assert_eq!(parasync_tensor::decode_vec(&bytes, DType::F32).unwrap(), values);

        // bf16 on the wire halves the bytes
        let req = ps::PullRequest { variable: "v".into(), worker_id: 0, step: 0, wire_dtype: ps::Dtype::Bf16 as i32, timeout_ms: 0 };
        let msgs: Vec<ps::PullResponse> = svc.pull(Request::new(req)).await.unwrap().into_inner().map(|m| m.unwrap()).collect().await;
        assert_eq!(msgs.iter().map(|m| m.data.len()).sum::<usize>(), 20);

        // a pull for a step nobody pushed times out with the server default and names the workers
        let req = ps::PullRequest { variable: "v".into(), worker_id: 0, step: 1, wire_dtype: ps::Dtype::F32 as i32, timeout_ms: 0 };
        let err = svc.pull(Request::new(req)).await.err().expect("must time out");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(err.message().contains("[0, 1]"), "{}", err.message());
    }

    #[tokio::test]
    async fn learning_rate_changes_are_validated() {
        let svc = service(Mode::Async { num_workers: 1, lr_div_staleness: false });
        svc.register(Request::new(register_req("a", &[1], &[0.0]))).await.unwrap();
        svc.register(Request::new(register_req("b", &[1], &[0.0]))).await.unwrap();
        let all = ps::SetLearningRateRequest { variable: String::new(), learning_rate: Some(0.5), all_variables: true };
        assert_eq!(svc.set_learning_rate(Request::new(all)).await.unwrap().into_inner().updated, 2);
        let bad = ps::SetLearningRateRequest { variable: "a".into(), learning_rate: Some(f32::NAN), all_variables: false };
        assert_eq!(svc.set_learning_rate(Request::new(bad)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        let missing = ps::SetLearningRateRequest { variable: "zz".into(), learning_rate: Some(0.1), all_variables: false };
        assert_eq!(svc.set_learning_rate(Request::new(missing)).await.unwrap_err().code(), tonic::Code::NotFound);

        // What a client built from the .proto sends by default: refused, nothing changed.
        let empty = ps::SetLearningRateRequest::default();
        let err = svc.set_learning_rate(Request::new(empty)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("all_variables"), "{}", err.message());
        let no_rate = ps::SetLearningRateRequest { variable: String::new(), learning_rate: None, all_variables: true };
        let err = svc.set_learning_rate(Request::new(no_rate)).await.unwrap_err();
        assert!(err.message().contains("learning_rate is required"), "{}", err.message());
        let both = ps::SetLearningRateRequest { variable: "a".into(), learning_rate: Some(0.1), all_variables: true };
        assert_eq!(svc.set_learning_rate(Request::new(both)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        let negative = ps::SetLearningRateRequest { variable: "a".into(), learning_rate: Some(-1.0), all_variables: false };
        assert_eq!(svc.set_learning_rate(Request::new(negative)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        let one = ps::SetLearningRateRequest { variable: "b".into(), learning_rate: Some(0.25), all_variables: false };
        assert_eq!(svc.set_learning_rate(Request::new(one)).await.unwrap().into_inner().updated, 1);

        // ServerInfo shows each variable's optimizer and current rate: only the valid changes took.
        let info = svc.server_info(Request::new(ps::ServerInfoRequest {})).await.unwrap().into_inner();
        let mut rates: Vec<(String, String, f32)> =
            info.variables.iter().map(|v| (v.name.clone(), v.optimizer.clone(), v.learning_rate)).collect();
        rates.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(rates, vec![("a".into(), "sgd".into(), 0.5), ("b".into(), "sgd".into(), 0.25)]);
    }
}
