//! The per-step client: connect to the shards, register the model, pull and push.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use parasync_proto::names::{self, Quoted};
use parasync_proto::ps::{self, parameter_server_client::ParameterServerClient};
use parasync_tensor::DType;
use tokio_stream::wrappers::ReceiverStream;
use parasync_proto::auth::{AuthToken, PresentToken};
use parasync_proto::tls::ClientTls;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::dataplane::DataPlane;
use crate::error::{Error, ErrorKind, Result};
use crate::placement::{place, Part, Placement};
use crate::spec::{dtype_to_proto, Init, VariableSpec};

pub(crate) type Rpc = ParameterServerClient<InterceptedService<Channel, PresentToken>>;

/// Explicit values above this many bytes are sent after registration as an assignment
/// stream, so no single message gets large.
const INLINE_INIT_BYTES: usize = 4 << 20;

/// The largest gRPC request this client sends: a chunk, or a registration with its values
/// inline (a larger one fails to encode).
pub(crate) fn grpc_request_limit(opts: &ClientOptions) -> usize {
    opts.chunk_bytes.max(INLINE_INIT_BYTES) * 2 + (64 << 10)
}

/// Settings of a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// This worker's id, `0..num_workers` (the order sync mode sums gradients in).
    pub worker_id: u32,
    /// How long to keep retrying (with backoff) while shards start.
    pub connect_timeout: Duration,
    /// Element type on the wire for pushes, and for pulls unless `pull_wire_dtype` is set
    /// (independent of the storage dtype).
    pub wire_dtype: DType,
    /// Element type on the wire for pulled values, when it differs from `wire_dtype`: for
    /// example bf16 gradients pushed and f32 weights pulled. `None`: `wire_dtype`.
    pub pull_wire_dtype: Option<DType>,
    /// Data bytes per streamed message.
    pub chunk_bytes: usize,
    /// Variables of at least this many bytes are split into row blocks over all shards.
    pub split_bytes: usize,
    /// Split variables are cut into blocks of at most this many bytes (rows permitting), so
    /// one large tensor moves as several concurrent streams.
    pub max_part_bytes: usize,
    /// How long the server may hold a pull waiting for its step (`None`: server default).
    pub pull_timeout: Option<Duration>,
    /// HTTP/2 connections opened to each shard; calls are spread over them.
    pub connections_per_shard: usize,
    /// Move tensor bytes over the shard's data plane (plain TCP beside gRPC) when the shard
    /// offers one; gRPC otherwise. Same semantics either way; the data plane copies less.
    pub data_plane: bool,
    /// Most requests in flight (hence data-plane connections) to one shard at once.
    pub data_connections_per_shard: usize,
    /// How long to poll for the reply of a small data-plane request (at most 64 KiB of
    /// values) before sleeping. Waking a sleeping thread costs tens of microseconds on an
    /// idle machine, more than the round trip itself: 100 µs of polling brings a 100 B push
    /// from about 110 µs to about 40 µs on the project's 2-core VM. The polling thread keeps
    /// its core busy meanwhile, which slows everything down where processes outnumber cores
    /// (the demo's 6 processes on 2 cores: 0.95 → 1.35 ms per step), so it is off
    /// (`Duration::ZERO`) unless set.
    pub reply_spin: Duration,
    /// How long a push, pull or push-pull keeps trying a shard that went away (with
    /// backoff) before it fails: a shard restarted from its checkpoint within this time is
    /// picked up again, and in sync mode the worker re-pushes the steps the restored shard
    /// lacks (see [`Client::push_pull`]). Zero fails at once.
    pub recovery_timeout: Duration,
    /// The token the shards require (their `--auth-token-file`). `None`: the one
    /// `PARASYNC_AUTH_TOKEN` (or the file `PARASYNC_AUTH_TOKEN_FILE` names) gives, if any.
    pub auth_token: Option<AuthToken>,
    /// TLS to the shards (their `--tls-cert`): the authority their certificates chain to,
    /// and a client certificate for shards that ask for one. `None`: plain TCP, unless
    /// `PARASYNC_TLS_CA` names a CA file (with `PARASYNC_TLS_CERT`, `PARASYNC_TLS_KEY` and
    /// `PARASYNC_TLS_DOMAIN` when needed).
    pub tls: Option<ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            worker_id: 0,
            connect_timeout: Duration::from_secs(30),
            wire_dtype: DType::F32,
            pull_wire_dtype: None,
            chunk_bytes: 1 << 20,
            split_bytes: 4 << 20,
            max_part_bytes: 16 << 20,
            pull_timeout: None,
            connections_per_shard: 1,
            data_plane: true,
            data_connections_per_shard: 8,
            reply_spin: Duration::ZERO,
            recovery_timeout: Duration::from_secs(60),
            auth_token: None,
            tls: None,
        }
    }
}

/// One shard: its address and open connections.
pub(crate) struct Shard {
    pub(crate) addr: String,
    /// Chunk buffers for pushes to this shard.
    pool: parasync_tensor::BufferPool,
    conns: Vec<Rpc>,
    next: std::sync::atomic::AtomicUsize,
    /// The shard's data plane, when it offers one and the client uses it.
    pub(crate) data: Option<DataPlane>,
    /// The shard process's incarnation as last seen (it changes when the shard restarts).
    incarnation: std::sync::atomic::AtomicU64,
}

impl Shard {
    pub(crate) fn rpc(&self) -> Rpc {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }
}

/// The registered model: specs, their placement, and the versions last pulled.
struct Model {
    specs: Vec<VariableSpec>,
    placement: Placement,
    /// Version of each part at the last pull (base of the next async push).
    versions: Mutex<Vec<Vec<u64>>>,
    /// The incarnation of its shard each part was last pushed to: a refusal by a shard that
    /// restarted since is recognised even when another part noticed the restart first.
    pushed_to: Vec<Vec<std::sync::atomic::AtomicU64>>,
}

/// Outcome of pushing a whole model's gradients for one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushSummary {
    /// Parts applied now or accepted for their sync step.
    pub accepted: usize,
    /// Parts dropped as late gradients for a completed sync step.
    pub dropped_stale: usize,
    /// Staleness of every applied async / bounded part.
    pub staleness: Vec<u64>,
    /// Parts sent more than once (a broken connection, a shard that restarted).
    pub retried: usize,
    /// Of the accepted parts, those an earlier attempt had applied (its reply was lost):
    /// the shard answered the retry with that attempt's result and applied nothing again.
    pub duplicate: usize,
    /// What became of each part, in registration order.
    pub parts: Vec<PartOutcome>,
}

/// What became of one part of a push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartOutcome {
    /// The variable's index (registration order).
    pub variable: usize,
    /// The part's index within the variable.
    pub part: usize,
    /// The shard holding the part.
    pub shard: usize,
    /// Applied exactly once (or accepted for its sync step), by this call's first attempt
    /// or a retry; false: dropped as stale.
    pub applied: bool,
    /// Times the part was sent (1: no retry).
    pub attempts: u32,
    /// Applied by an earlier attempt, whose reply was lost (the shard answered the retry
    /// with that attempt's result).
    pub duplicate: bool,
}

impl PushSummary {
    fn add(&mut self, variable: usize, part: &Part, index: usize, r: &ps::PushResponse, attempts: u32) {
        if r.accepted {
            self.accepted += 1;
            self.staleness.push(r.staleness);
        }
        if r.dropped_stale {
            self.dropped_stale += 1;
        }
        self.retried += usize::from(attempts > 1);
        self.duplicate += usize::from(r.duplicate);
        self.parts.push(PartOutcome {
            variable,
            part: index,
            shard: part.shard,
            applied: r.accepted,
            attempts,
            duplicate: r.duplicate,
        });
    }
}

/// Mode and variables of one shard, as the shard reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    /// Address the client connected to.
    pub addr: String,
    /// `sync`, `async` or `bounded`.
    pub mode: String,
    /// The shard's index.
    pub shard_index: u32,
    /// Workers the shard expects.
    pub num_workers: u32,
    /// Late gradients dropped so far.
    pub dropped_stale: u64,
    /// `(name, version)` of each variable on the shard.
    pub variables: Vec<(String, u64)>,
    /// Address of the shard's data plane when this client moves tensors over it; `None`
    /// when they go over gRPC.
    pub data_plane: Option<String>,
    /// The step of the checkpoint the shard started from, if it was restored from one.
    pub restored_step: Option<u64>,
    /// The shard writes checkpoints.
    pub checkpoints: bool,
    /// The shard's sparse tables.
    pub tables: Vec<TableInfo>,
}

/// One sparse table on one shard, as the shard reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub name: String,
    pub dim: u32,
    /// Completed sync steps, or applied pushes.
    pub version: u64,
    /// Rows held now, created, evicted.
    pub rows: u64,
    pub admitted: u64,
    pub evicted: u64,
    /// Row updates dropped (the id was not admitted yet, or the table was full).
    pub dropped: u64,
    /// Rows looked up and rows pushed so far.
    pub rows_looked_up: u64,
    pub rows_pushed: u64,
}

/// One shard's file of a checkpoint (see [`Client::checkpoint`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointFile {
    pub shard: usize,
    pub step: u64,
    /// Where the shard wrote it (a path on the shard's machine).
    pub path: String,
    pub bytes: u64,
    pub seconds: f64,
}

/// A trainer's connection to every shard of a parameter-server job.
///
/// Calls to different shards (and different parts) are in flight concurrently. Methods
/// take `&self`, so one client can be shared by the tasks of a worker.
pub struct Client {
    pub(crate) shards: Vec<Shard>,
    pub(crate) opts: ClientOptions,
    model: Option<Model>,
    /// Drawn at random when the client connects: with `sequence`, names each push, so a
    /// shard applies a retried one at most once.
    incarnation: u64,
    /// Pushes sent so far (each push call's parts share one number; a retry reuses it).
    sequence: std::sync::atomic::AtomicU64,
    /// The newest checkpoint step a shard named in a push reply (time-based checkpoints):
    /// passed on to every shard in this worker's pushes of the steps up to it.
    checkpoint_step: std::sync::atomic::AtomicU64,
    /// Sparse tables registered by this client (see [`Client::register_table`]).
    pub(crate) tables: Mutex<std::collections::HashMap<String, crate::sparse::KnownTable>>,
}

impl Client {
    /// Connects to every shard, retrying with backoff until `opts.connect_timeout`.
    pub async fn connect(addrs: &[String], opts: ClientOptions) -> Result<Client> {
        if addrs.is_empty() {
            return Err(Error::usage("no parameter-server addresses given"));
        }
        if opts.chunk_bytes < 4 || opts.connections_per_shard == 0 {
            return Err(Error::usage("chunk_bytes must be at least 4 and connections_per_shard at least 1"));
        }
        let mut opts = opts;
        if opts.auth_token.is_none() {
            opts.auth_token = AuthToken::from_env().map_err(Error::usage)?;
        }
        if opts.tls.is_none() {
            opts.tls = tls_from_env().map_err(Error::usage)?;
        }
        let shards = try_join_all(addrs.iter().enumerate().map(|(i, a)| connect_shard(i, a, &opts))).await?;
        // Random (std's hasher keys are seeded from the OS), mixed with the time for good measure.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let incarnation = (std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), nanos)) | 1;
        Ok(Client { shards, opts, model: None, incarnation, sequence: std::sync::atomic::AtomicU64::new(0), checkpoint_step: Default::default(), tables: Default::default() })
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// The options in force.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// The registered variables, in registration order (empty before [`Client::register`]).
    pub fn specs(&self) -> &[VariableSpec] {
        self.model.as_ref().map_or(&[], |m| &m.specs)
    }

    /// Where each registered variable lives (after [`Client::register`]).
    pub fn placement(&self) -> Option<&Placement> {
        self.model.as_ref().map(|m| &m.placement)
    }

    /// Registers the model's variables on their shards (idempotent: every worker may call
    /// it with the same specs). Fixes the variable order of later pulls and pushes.
    pub async fn register(&mut self, specs: Vec<VariableSpec>) -> Result<()> {
        let mut names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::usage(format!("variable {} is listed twice", Quoted(w[0]))));
        }
        for s in &specs {
            names::check_name(&s.name, names::MAX_NAME_BYTES)
                .map_err(|reason| Error::usage(format!("variable {}: {reason}", Quoted(&s.name))))?;
            let bytes = s.shape.iter().try_fold(s.dtype.size(), |acc, &d| acc.checked_mul(d));
            if bytes.is_none_or(|b| b > isize::MAX as usize) {
                return Err(Error::usage(format!("variable {}: shape {:?} is too large to hold", Quoted(&s.name), s.shape)));
            }
            if s.is_empty() {
                return Err(Error::usage(format!("variable {} has an empty shape {:?}", Quoted(&s.name), s.shape)));
            }
            if let Init::Values(v) = &s.init {
                if v.len() != s.len() {
                    return Err(Error::usage(format!(
                        "variable {}: {} initial values for shape {:?} ({} elements)",
                        Quoted(&s.name),
                        v.len(),
                        s.shape,
                        s.len()
                    )));
                }
            }
        }
        let keys: Vec<(&str, &[usize], DType)> =
            specs.iter().map(|s| (s.name.as_str(), s.shape.as_slice(), s.dtype)).collect();
        let placement = place(&keys, self.shards.len(), self.opts.split_bytes, self.opts.max_part_bytes);
        let mut calls = Vec::new();
        for (spec, parts) in specs.iter().zip(&placement.parts) {
            for (pi, part) in parts.iter().enumerate() {
                calls.push(self.register_part(spec, part, pi as u64));
            }
        }
        try_join_all(calls).await?;
        let versions = placement.parts.iter().map(|p| vec![0; p.len()]).collect();
        let pushed_to = placement
            .parts
            .iter()
            .map(|p| p.iter().map(|part| self.shards[part.shard].incarnation.load(std::sync::atomic::Ordering::Acquire).into()).collect())
            .collect();
        self.model = Some(Model { specs, placement, versions: Mutex::new(versions), pushed_to });
        Ok(())
    }

    async fn register_part(&self, spec: &VariableSpec, part: &Part, index: u64) -> Result<()> {
        use ps::initializer::Kind;
        // Split pieces draw from their own stream so pieces do not repeat each other.
        let seed = |s: u64| s.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // Values sent after the registration (too large for it, or a registration that
        // found the variable made by an `Init::Adopt` worker and still waiting for them).
        let mut values = None;
        let mut inline = false;
        let init = match &spec.init {
            Init::Zeros => None,
            Init::Constant(c) => Some(Kind::Constant(*c)),
            Init::Uniform { low, high, seed: s } => Some(Kind::Uniform(ps::UniformInit { low: *low, high: *high, seed: seed(*s) })),
            Init::Normal { mean, stddev, seed: s } => {
                Some(Kind::Normal(ps::NormalInit { mean: *mean, stddev: *stddev, seed: seed(*s) }))
            }
            Init::Values(v) => {
                let slice = &v[part.elements.clone()];
                values = Some(slice);
                inline = slice.len() * 4 <= INLINE_INIT_BYTES;
                if inline {
                    let mut data = Vec::new();
                    parasync_tensor::encode_f32(slice, DType::F32, &mut data);
                    Some(Kind::Values(ps::TensorValues { dtype: dtype_to_proto(DType::F32), data: data.into() }))
                } else {
                    Some(Kind::ValuesFollow(true))
                }
            }
            Init::Adopt => Some(Kind::ValuesFollow(true)),
        };
        let req = ps::RegisterRequest {
            name: part.name.clone(),
            shape: part.shape.iter().map(|&d| d as u64).collect(),
            storage_dtype: dtype_to_proto(spec.dtype),
            optimizer: Some(spec.optimizer.to_proto()),
            init: init.map(|k| ps::Initializer { kind: Some(k) }),
            stochastic_rounding: spec.stochastic_rounding,
        };
        let shard = &self.shards[part.shard];
        let resp = shard
            .rpc()
            .register(req)
            .await
            .map_err(|s| Error::from_status(s, &format!("register {:?} on shard {} ({})", part.name, part.shard, shard.addr)))?
            .into_inner();
        // The creator assigns values too large for the registration; so does anyone with
        // values who finds them still missing (the creator died before sending them, or it
        // registered with `Init::Adopt`). The server keeps the first assignment only.
        if let (Some(values), true) = (values, (resp.created && !inline) || resp.awaiting_values) {
            self.send_part(part, 0, 0, values, DType::F32, ps::PushKind::Assign, 0).await?;
        }
        Ok(())
    }

    fn model(&self) -> Result<&Model> {
        self.model.as_ref().ok_or_else(|| Error::usage("register the model before pulling or pushing"))
    }

    /// Pulls every variable for `step` (sync: waits until the step exists; bounded: waits
    /// for the slowest worker) into new buffers, in registration order.
    pub async fn pull(&self, step: u64) -> Result<Vec<Vec<f32>>> {
        let model = self.model()?;
        let mut out: Vec<Vec<f32>> = model.specs.iter().map(|s| vec![0.0; s.len()]).collect();
        self.pull_into(step, &mut out).await?;
        Ok(out)
    }

    /// Like [`Client::pull`], into caller-owned buffers (one per variable, exact sizes):
    /// `Vec<f32>`s, or `&mut [f32]` views of memory the caller owns (a NumPy array, a C
    /// buffer), written in place.
    pub async fn pull_into<B: AsMut<[f32]>>(&self, step: u64, out: &mut [B]) -> Result<()> {
        let model = self.model()?;
        check_sizes(model, out.iter_mut().map(|v| v.as_mut().len()))?;
        let mut calls = Vec::new();
        for (vi, (buf, parts)) in out.iter_mut().zip(&model.placement.parts).enumerate() {
            let mut rest: &mut [f32] = buf.as_mut();
            for (pi, part) in parts.iter().enumerate() {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(part.elements.len());
                rest = tail;
                calls.push(async move { self.pull_part(vi, pi, step, dst).await.map(|v| (vi, pi, v)) });
            }
        }
        let versions = try_join_all(calls).await?;
        let mut stored = model.versions.lock().expect("versions lock");
        for (vi, pi, v) in versions {
            stored[vi][pi] = v;
        }
        Ok(())
    }

    async fn pull_part(&self, vi: usize, pi: usize, step: u64, dst: &mut [f32]) -> Result<u64> {
        let part = &self.model()?.placement.parts[vi][pi];
        let started = Instant::now();
        loop {
            let seen = self.shards[part.shard].incarnation.load(std::sync::atomic::Ordering::Acquire);
            match self.pull_part_once(part, step, dst).await {
                Err(e) if self.recoverable(&e, started) => {
                    let info = self.await_shard(part.shard, e, started).await?;
                    if info.incarnation != seen {
                        self.pull_after_restart(vi, pi, step, &info).await?;
                    }
                }
                r => return r,
            }
        }
    }

    /// A pull of part `pi` of variable `vi` for `step` found its shard restarted: registers
    /// the variable again if the shard lost it; fails if, in sync mode, the shard restored an
    /// older step than `step`: only pushes of the steps it lacks can take it there, and a
    /// pull has no gradient to push (a push-pull does, and re-pushes them on its own).
    async fn pull_after_restart(&self, vi: usize, pi: usize, step: u64, info: &ps::ServerInfoResponse) -> Result<()> {
        let (version, _) = self.part_on_restarted_shard(vi, pi, info).await?;
        if info.mode == "sync" && version < step {
            let part = &self.model()?.placement.parts[vi][pi];
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "pull {:?} for step {step}: shard {} restarted from its checkpoint of step {version}, so steps {version}..{} must be pushed again before step {step} can be pulled; push them (push() of each step), or train with push_pull, which re-pushes them on its own",
                    part.name,
                    part.shard,
                    step - 1
                ),
            ));
        }
        Ok(())
    }

    /// What a restarted shard (`info`) holds of part `pi` of variable `vi`: its version and
    /// this worker's clock (bounded mode; 0 otherwise). A part the shard lost (no checkpoint
    /// held it) is registered again from its initializer, at version 0.
    async fn part_on_restarted_shard(&self, vi: usize, pi: usize, info: &ps::ServerInfoResponse) -> Result<(u64, u64)> {
        let model = self.model()?;
        let part = &model.placement.parts[vi][pi];
        match info.variables.iter().find(|v| v.name == part.name) {
            Some(v) => Ok((v.version, v.worker_clocks.get(self.opts.worker_id as usize).copied().unwrap_or(0))),
            None => {
                tracing::warn!(shard = part.shard, variable = %part.name, "the restarted shard lost the variable (no checkpoint held it): registering it again from its initializer");
                self.register_part(&model.specs[vi], part, pi as u64).await?;
                Ok((0, 0))
            }
        }
    }

    async fn pull_part_once(&self, part: &Part, step: u64, dst: &mut [f32]) -> Result<u64> {
        let shard = &self.shards[part.shard];
        let ctx = || format!("pull {:?} for step {step} from shard {} ({})", part.name, part.shard, shard.addr);
        let wire = self.pull_wire();
        let req = ps::PullRequest {
            variable: part.name.clone(),
            worker_id: self.opts.worker_id,
            step,
            wire_dtype: dtype_to_proto(wire),
            timeout_ms: self.pull_timeout_ms(),
        };
        if let Some(data) = &shard.data {
            return data.pull(req, part, wire, dst, &ctx()).await;
        }
        let mut stream = shard.rpc().pull(req).await.map_err(|s| Error::from_status(s, &ctx()))?.into_inner();
        Ok(receive_values(&mut stream, part, wire, dst, &ctx()).await?.0)
    }

    /// Pushes one gradient per variable (registration order) for `step`. Each part is
    /// streamed in chunks to its shard; all parts are in flight at once.
    pub async fn push(&self, step: u64, grads: &[&[f32]]) -> Result<PushSummary> {
        let model = self.model()?;
        check_sizes(model, grads.iter().map(|g| g.len()))?;
        let bases = model.versions.lock().expect("versions lock").clone();
        let seq = self.next_sequence();
        let mut calls = Vec::new();
        for (vi, (g, parts)) in grads.iter().zip(&model.placement.parts).enumerate() {
            for (pi, part) in parts.iter().enumerate() {
                let data = &g[part.elements.clone()];
                let base = bases[vi][pi];
                calls.push(async move { Ok::<_, Error>((vi, pi, self.push_part(vi, pi, step, base, data, seq).await?)) });
            }
        }
        let mut summary = PushSummary::default();
        for (vi, pi, (r, attempts)) in try_join_all(calls).await? {
            self.note_reply(&r);
            summary.add(vi, &model.placement.parts[vi][pi], pi, &r, attempts);
        }
        Ok(summary)
    }

    async fn send_part(
        &self,
        part: &Part,
        step: u64,
        base_version: u64,
        data: &[f32],
        wire: DType,
        kind: ps::PushKind,
        seq: u64,
    ) -> Result<ps::PushResponse> {
        let shard = &self.shards[part.shard];
        let ctx = || format!("push {:?} for step {step} to shard {} ({})", part.name, part.shard, shard.addr);
        let header = self.push_header(part, step, base_version, data.len(), wire, kind, seq);
        if let Some(plane) = &shard.data {
            return plane.push(header, data, wire, &ctx()).await;
        }
        let chunk = self.opts.chunk_bytes;
        let resp = match single_message(&shard.pool, &header, data, wire, chunk) {
            Some(msg) => shard.rpc().push(tokio_stream::once(msg)).await,
            None => {
                let (tx, rx) = tokio::sync::mpsc::channel(PUSH_QUEUE);
                let mut rpc = shard.rpc();
                let call = rpc.push(ReceiverStream::new(rx));
                tokio::join!(feed_chunks(tx, &shard.pool, header, data, wire, chunk), call).1
            }
        };
        Ok(resp.map_err(|s| Error::from_status(s, &ctx()))?.into_inner())
    }

    /// Pushes one gradient per variable for `step` and receives, in the same round trip,
    /// the values for `step + 1` into `out` (sync: once step `step` completes on every
    /// shard; bounded: once the slowest worker allows; async: right after the update).
    /// Equivalent to `push(step, grads)` then `pull_into(step + 1, out)`, with one call
    /// per part instead of two. When a part's push is accepted but its pull fails (the step
    /// timed out, the shard is shutting down), the error says "the push was accepted":
    /// pushing the same gradient again would be refused as a duplicate (sync, bounded) or
    /// applied twice (async).
    pub async fn push_pull<B: AsMut<[f32]>>(&self, step: u64, grads: &[&[f32]], out: &mut [B]) -> Result<PushSummary> {
        let model = self.model()?;
        check_sizes(model, grads.iter().map(|g| g.len()))?;
        check_sizes(model, out.iter_mut().map(|v| v.as_mut().len()))?;
        let bases = model.versions.lock().expect("versions lock").clone();
        let seq = self.next_sequence();
        let mut calls = Vec::new();
        for (vi, ((g, buf), parts)) in grads.iter().zip(out.iter_mut()).zip(&model.placement.parts).enumerate() {
            let mut rest: &mut [f32] = buf.as_mut();
            for (pi, part) in parts.iter().enumerate() {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(part.elements.len());
                rest = tail;
                let data = &g[part.elements.clone()];
                let base = bases[vi][pi];
                calls.push(async move {
                    let (version, push, attempts) = self.push_pull_part(vi, pi, step, base, data, dst, seq).await?;
                    Ok::<_, Error>((vi, pi, version, push, attempts))
                });
            }
        }
        let results = try_join_all(calls).await?;
        let mut summary = PushSummary::default();
        let mut stored = model.versions.lock().expect("versions lock");
        for (vi, pi, version, r, attempts) in results {
            stored[vi][pi] = version;
            self.note_reply(&r);
            summary.add(vi, &model.placement.parts[vi][pi], pi, &r, attempts);
        }
        Ok(summary)
    }

    /// One part of a push-pull: push `data` for `step`, receive the values of `step + 1`.
    async fn push_pull_part_once(&self, part: &Part, step: u64, base: u64, data: &[f32], dst: &mut [f32], seq: u64) -> Result<(u64, ps::PushResponse)> {
        let (wire, pull_wire) = (self.opts.wire_dtype, self.pull_wire());
        let header = self.push_header(part, step, base, data.len(), wire, ps::PushKind::Gradient, seq);
        let shard = &self.shards[part.shard];
        let ctx = || format!("push-pull {:?} for step {step} on shard {} ({})", part.name, part.shard, shard.addr);
        if let Some(plane) = &shard.data {
            return plane.push_pull(header, data, wire, part, pull_wire, dst, &ctx()).await;
        }
        let chunk = self.opts.chunk_bytes;
        let opened = match single_message(&shard.pool, &header, data, wire, chunk) {
            Some(msg) => shard.rpc().push_pull(tokio_stream::once(msg)).await,
            None => {
                let (tx, rx) = tokio::sync::mpsc::channel(PUSH_QUEUE);
                let mut rpc = shard.rpc();
                let call = rpc.push_pull(ReceiverStream::new(rx));
                tokio::join!(feed_chunks(tx, &shard.pool, header, data, wire, chunk), call).1
            }
        };
        let mut stream = opened.map_err(|s| Error::from_status(s, &ctx()))?.into_inner();
        let (version, push) = receive_values(&mut stream, part, pull_wire, dst, &ctx()).await?;
        let push = push.ok_or_else(|| Error::new(ErrorKind::Internal, format!("{}: no push result", ctx())))?;
        Ok((version, push))
    }

    /// A push-pull of part `pi` of variable `vi` that rides out a restart of its shard (see
    /// [`Client::push_pull`]). Returns the version received, the push's reply and how many
    /// times it was sent.
    #[allow(clippy::too_many_arguments)]
    async fn push_pull_part(&self, vi: usize, pi: usize, step: u64, base: u64, data: &[f32], dst: &mut [f32], seq: u64) -> Result<(u64, ps::PushResponse, u32)> {
        let model = self.model()?;
        let part = &model.placement.parts[vi][pi];
        let started = Instant::now();
        let pushed_to = &model.pushed_to[vi][pi];
        let mut seen = pushed_to.load(std::sync::atomic::Ordering::Acquire);
        let mut base = base;
        for attempts in 1.. {
            let e = match self.push_pull_part_once(part, step, base, data, dst, seq).await {
                Err(e) if self.recoverable(&e, started) || self.refused_by_a_restarted_shard(&e, part.shard, seen).await => e,
                r => {
                    pushed_to.store(seen, std::sync::atomic::Ordering::Release);
                    return r.map(|(v, push)| (v, push, attempts));
                }
            };
            match self.recover_push(vi, pi, step, base, data, e, started, &mut seen).await? {
                Recovered::Retry(b) => base = b,
                Recovered::Applied { resent } => {
                    pushed_to.store(seen, std::sync::atomic::Ordering::Release);
                    let version = self.pull_part(vi, pi, step + 1, dst).await?;
                    return Ok((version, ps::PushResponse { accepted: true, ..Default::default() }, attempts + u32::from(resent)));
                }
            }
        }
        unreachable!("the attempts run out only after u32::MAX tries")
    }

    /// A gradient push of part `pi` of variable `vi` that rides out a restart of its shard.
    /// Returns the reply and how many times the push was sent.
    async fn push_part(&self, vi: usize, pi: usize, step: u64, base: u64, data: &[f32], seq: u64) -> Result<(ps::PushResponse, u32)> {
        let model = self.model()?;
        let part = &model.placement.parts[vi][pi];
        let started = Instant::now();
        let pushed_to = &model.pushed_to[vi][pi];
        let mut seen = pushed_to.load(std::sync::atomic::Ordering::Acquire);
        let mut base = base;
        for attempts in 1.. {
            let e = match self.send_part(part, step, base, data, self.opts.wire_dtype, ps::PushKind::Gradient, seq).await {
                Err(e) if self.recoverable(&e, started) || self.refused_by_a_restarted_shard(&e, part.shard, seen).await => e,
                r => {
                    pushed_to.store(seen, std::sync::atomic::Ordering::Release);
                    return r.map(|push| (push, attempts));
                }
            };
            match self.recover_push(vi, pi, step, base, data, e, started, &mut seen).await? {
                Recovered::Retry(b) => base = b,
                Recovered::Applied { resent } => {
                    pushed_to.store(seen, std::sync::atomic::Ordering::Release);
                    return Ok((ps::PushResponse { accepted: true, ..Default::default() }, attempts + u32::from(resent)));
                }
            }
        }
        unreachable!("the attempts run out only after u32::MAX tries")
    }

    /// A push of `data` for `step` failed with `error` because its shard went away: waits
    /// for the shard, and decides what to do.
    ///
    /// - The shard restarted (a new incarnation): a variable it lost is registered again;
    ///   in sync mode, if the variable is behind `step` (restored from an older checkpoint),
    ///   this worker pushes `data` for each missing step first, waiting for each to complete
    ///   (every worker does the same, so each step gets every worker's gradient); if it is
    ///   past `step`, the push was applied. Then the push is sent again.
    /// - The same shard came back (a connection broke, a reply was lost): the push is sent
    ///   again under the same number; the shard applies it only if the first never arrived
    ///   (otherwise it answers with the first one's result).
    #[allow(clippy::too_many_arguments)]
    async fn recover_push(
        &self,
        vi: usize,
        pi: usize,
        step: u64,
        base: u64,
        data: &[f32],
        error: Error,
        started: Instant,
        seen: &mut u64,
    ) -> Result<Recovered> {
        let model = self.model()?;
        let part = &model.placement.parts[vi][pi];
        let info = self.await_shard(part.shard, error.clone(), started).await?;
        let restarted = info.incarnation != *seen;
        *seen = info.incarnation;
        if !restarted && info.mode != "bounded" {
            // The same shard: the push goes again with the same number, and the shard
            // applies it only if the first one never arrived.
            return Ok(Recovered::Retry(base));
        }
        let (version, clock) = self.part_on_restarted_shard(vi, pi, &info).await?;
        if info.mode == "bounded" {
            // The shard's clock of this worker says what it has (whether it restarted, or
            // another part of this worker noticed the restart first): steps below it were
            // applied, and the shard refuses a step twice.
            if clock > step {
                return Ok(Recovered::Applied { resent: false });
            }
            if clock < step {
                tracing::warn!(shard = part.shard, variable = %part.name, from = clock, to = step, "the restarted shard lacks steps of this worker: pushing this gradient for them");
            }
            // This worker's steps the shard lacks, then this one, each once the slowest
            // worker lets it through (the others are catching up the same way).
            for s in clock..=step {
                self.push_when_within_bound(part, s, version, data, started).await?;
            }
            return Ok(Recovered::Applied { resent: true });
        }
        if info.mode == "sync" {
            if version > step {
                return Ok(Recovered::Applied { resent: false });
            }
            if version < step {
                tracing::warn!(shard = part.shard, variable = %part.name, from = version, to = step, "the restarted shard is behind: pushing this gradient for the steps it lacks");
                let mut scratch = vec![0f32; part.elements.len()];
                for s in version..step {
                    self.push_pull_part_once(part, s, s, data, &mut scratch, self.next_sequence()).await?;
                }
            }
        }
        // Async / bounded: the gradient counts as computed from the restored version at
        // the latest (a later one is refused as from the future).
        Ok(Recovered::Retry(base.min(version)))
    }

    /// Bounded mode, after a restart: pushes `data` for `step` (computed from `base`),
    /// waiting while the shard refuses it as too far ahead of the slowest worker, until
    /// `recovery_timeout` after `started`.
    async fn push_when_within_bound(&self, part: &Part, step: u64, base: u64, data: &[f32], started: Instant) -> Result<()> {
        let mut backoff = Duration::from_millis(2);
        loop {
            match self.send_part(part, step, base, data, self.opts.wire_dtype, ps::PushKind::Gradient, self.next_sequence()).await {
                Err(e) if e.kind == ErrorKind::OutOfRange && started.elapsed() < self.opts.recovery_timeout => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                r => return r.map(|_| ()),
            }
        }
    }

    /// Is `e` a refusal (a step or version from the future, an unknown variable) by a shard
    /// that restarted since incarnation `seen` (or, in bounded mode, at all), so behind what
    /// this worker knows?
    async fn refused_by_a_restarted_shard(&self, e: &Error, shard: usize, seen: u64) -> bool {
        if self.opts.recovery_timeout.is_zero() || !matches!(e.kind, ErrorKind::OutOfRange | ErrorKind::NotFound) {
            return false;
        }
        match self.shards[shard].rpc().server_info(ps::ServerInfoRequest {}).await {
            // Bounded mode: a step past the slowest worker's bound can only come after a
            // restart lost steps (a worker pulls only what the bound allows), even when
            // another part of this worker saw the new incarnation first.
            Ok(r) => {
                let info = r.into_inner();
                info.incarnation != seen || (info.mode == "bounded" && e.kind == ErrorKind::OutOfRange)
            }
            Err(_) => false,
        }
    }

    /// Is `e` a shard that went away, with time left to wait for it?
    fn recoverable(&self, e: &Error, started: Instant) -> bool {
        e.kind == ErrorKind::Unavailable && started.elapsed() < self.opts.recovery_timeout
    }

    /// Waits with backoff until shard `i` answers again (up to `recovery_timeout` after
    /// `started`); its info, or `error` (with how long it waited) if it never does.
    async fn await_shard(&self, i: usize, error: Error, started: Instant) -> Result<ps::ServerInfoResponse> {
        let shard = &self.shards[i];
        let mut backoff = Duration::from_millis(20);
        loop {
            match shard.rpc().server_info(ps::ServerInfoRequest {}).await {
                Ok(r) => {
                    let info = r.into_inner();
                    let old = shard.incarnation.swap(info.incarnation, std::sync::atomic::Ordering::AcqRel);
                    if old != info.incarnation {
                        tracing::warn!(
                            shard = i,
                            addr = %shard.addr,
                            restored_step = info.restored.then_some(info.restored_step),
                            "the shard restarted"
                        );
                    }
                    return Ok(info);
                }
                Err(_) if started.elapsed() < self.opts.recovery_timeout => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(_) => {
                    return Err(Error::new(
                        error.kind,
                        format!("{error} (shard {i} did not come back within {:?})", self.opts.recovery_timeout),
                    ))
                }
            }
        }
    }

    /// `ClientOptions::pull_timeout` as the wire's milliseconds (0: the server's default).
    pub(crate) fn pull_timeout_ms(&self) -> u32 {
        self.opts.pull_timeout.map_or(0, |t| t.as_millis().min(u32::MAX as u128) as u32)
    }

    /// The number of the next push (from 1).
    fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// The header of push `seq` (0: an assignment, which needs no number: only the first is taken).
    #[allow(clippy::too_many_arguments)]
    fn push_header(&self, part: &Part, step: u64, base_version: u64, len: usize, wire: DType, kind: ps::PushKind, seq: u64) -> ps::PushHeader {
        ps::PushHeader {
            variable: part.name.clone(),
            worker_id: self.opts.worker_id,
            step,
            base_version,
            wire_dtype: dtype_to_proto(wire),
            num_elements: len as u64,
            kind: kind as i32,
            pull_timeout_ms: self.pull_timeout_ms(),
            pull_wire_dtype: dtype_to_proto(self.pull_wire()),
            client_incarnation: if seq == 0 { 0 } else { self.incarnation },
            sequence: seq,
            checkpoint_step: if kind == ps::PushKind::Gradient { self.checkpoint_step_for(step) } else { 0 },
        }
    }

    /// The checkpoint step a gradient push of `step` (dense or sparse) passes on: the newest
    /// a shard named, while `step` has not passed it (0: none).
    pub(crate) fn checkpoint_step_for(&self, step: u64) -> u64 {
        match self.checkpoint_step.load(std::sync::atomic::Ordering::Relaxed) {
            c if c >= step => c,
            _ => 0,
        }
    }

    /// Keeps the checkpoint step a shard's push reply (dense or sparse) names, to pass it on.
    pub(crate) fn note_reply(&self, r: &ps::PushResponse) {
        if r.checkpoint_due > 0 {
            self.checkpoint_step.fetch_max(r.checkpoint_due, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The wire dtype of pulled values.
    pub(crate) fn pull_wire(&self) -> DType {
        self.opts.pull_wire_dtype.unwrap_or(self.opts.wire_dtype)
    }

    /// Sets the learning rate of every variable on every shard.
    pub async fn set_learning_rate(&self, lr: f32) -> Result<()> {
        try_join_all(self.shards.iter().enumerate().map(|(i, s)| async move {
            s.rpc()
                .set_learning_rate(ps::SetLearningRateRequest { variable: String::new(), learning_rate: Some(lr), all_variables: true })
                .await
                .map_err(|e| Error::from_status(e, &format!("set learning rate on shard {i} ({})", s.addr)))
        }))
        .await?;
        Ok(())
    }

    /// Asks every shard for its mode and variables.
    pub async fn shard_info(&self) -> Result<Vec<ShardInfo>> {
        try_join_all(self.shards.iter().enumerate().map(|(i, s)| async move {
            let r = s
                .rpc()
                .server_info(ps::ServerInfoRequest {})
                .await
                .map_err(|e| Error::from_status(e, &format!("server info of shard {i} ({})", s.addr)))?
                .into_inner();
            Ok(ShardInfo {
                addr: s.addr.clone(),
                mode: r.mode,
                shard_index: r.shard_index,
                num_workers: r.num_workers,
                dropped_stale: r.dropped_stale,
                variables: r.variables.into_iter().map(|v| (v.name, v.version)).collect(),
                data_plane: s.data.as_ref().map(|d| d.addr().to_string()),
                restored_step: r.restored.then_some(r.restored_step),
                checkpoints: r.checkpoints,
                tables: r
                    .tables
                    .into_iter()
                    .map(|t| TableInfo {
                        name: t.name,
                        dim: t.dim,
                        version: t.version,
                        rows: t.rows,
                        admitted: t.admitted,
                        evicted: t.evicted,
                        dropped: t.dropped,
                        rows_looked_up: t.rows_looked_up,
                        rows_pushed: t.rows_pushed,
                    })
                    .collect(),
            })
        }))
        .await
    }

    /// Has every shard write a checkpoint of `step` and returns once all are on disk.
    ///
    /// In sync mode, call it from one worker (the chief) with the step it is about to push,
    /// i.e. the step whose values it last pulled: every variable is saved exactly as that
    /// step left it (shards wait for variables still short of it). In async and bounded
    /// mode each shard saves its variables as they are, under the name `step-<step>`.
    pub async fn checkpoint(&self, step: u64) -> Result<Vec<CheckpointFile>> {
        try_join_all(self.shards.iter().enumerate().map(|(i, s)| async move {
            let r = s
                .rpc()
                .checkpoint(ps::CheckpointRequest { step })
                .await
                .map_err(|e| Error::from_status(e, &format!("checkpoint on shard {i} ({})", s.addr)))?
                .into_inner();
            Ok(CheckpointFile { shard: i, step: r.step, path: r.path, bytes: r.bytes, seconds: r.seconds })
        }))
        .await
    }
}

/// What a push does after its shard came back (see [`Client::recover_push`]).
enum Recovered {
    /// Send it again, as computed from this version (the restored shard's, when it is older
    /// than the one the gradient was computed from).
    Retry(u64),
    /// It is applied (`resent`: by the recovery, which sent it again): do not send it again.
    Applied { resent: bool },
}

/// Chunks queued ahead of the network per push stream.
const PUSH_QUEUE: usize = 4;

/// The whole push as one message, when `data` fits one chunk (the small-tensor latency
/// path: no queue, no feeding task); `None` otherwise.
fn single_message(pool: &parasync_tensor::BufferPool, header: &ps::PushHeader, data: &[f32], wire: DType, chunk_bytes: usize) -> Option<ps::PushRequest> {
    (data.len() * wire.size() <= chunk_bytes.max(wire.size()))
        .then(|| ps::PushRequest { header: Some(header.clone()), data: encode_chunk(pool, data, wire) })
}

/// Feeds a push stream chunk by chunk, each encoded just before it is queued, so the
/// tensor is never held encoded all at once.
async fn feed_chunks(
    tx: tokio::sync::mpsc::Sender<ps::PushRequest>,
    pool: &parasync_tensor::BufferPool,
    header: ps::PushHeader,
    data: &[f32],
    wire: DType,
    chunk_bytes: usize,
) {
    let per_chunk = (chunk_bytes / wire.size()).max(1);
    let mut header = Some(header);
    for c in data.chunks(per_chunk) {
        let msg = ps::PushRequest { header: header.take(), data: encode_chunk(pool, c, wire) };
        if tx.send(msg).await.is_err() {
            break; // the call ended early; its status says why
        }
    }
}

fn encode_chunk(pool: &parasync_tensor::BufferPool, c: &[f32], wire: DType) -> bytes::Bytes {
    let mut buf = pool.take(c.len() * wire.size());
    parasync_tensor::encode_f32(c, wire, &mut buf);
    pool.freeze(buf)
}

/// A message of a value stream: pull replies and push-pull replies.
trait ValueChunk {
    /// (header of the first message, data, push outcome of the first push-pull message).
    fn into_parts(self) -> (Option<ps::PullHeader>, bytes::Bytes, Option<ps::PushResponse>);
}

impl ValueChunk for ps::PullResponse {
    fn into_parts(self) -> (Option<ps::PullHeader>, bytes::Bytes, Option<ps::PushResponse>) {
        (self.header, self.data, None)
    }
}

impl ValueChunk for ps::PushPullResponse {
    fn into_parts(self) -> (Option<ps::PullHeader>, bytes::Bytes, Option<ps::PushResponse>) {
        (self.header, self.data, self.push)
    }
}

/// Reads a stream of value chunks (header first) into `dst`; returns the version and the
/// push outcome if the stream carried one. `ctx` names the call in errors.
async fn receive_values<M: ValueChunk>(
    stream: &mut tonic::Streaming<M>,
    part: &Part,
    wire: DType,
    dst: &mut [f32],
    ctx: &str,
) -> Result<(u64, Option<ps::PushResponse>)> {
    let ctx = || ctx.to_string();
    let mut filled = 0usize;
    let mut version = None;
    let mut push = None;
    while let Some(msg) = stream.message().await.map_err(|s| Error::from_status(s, &ctx()))? {
        let (header, data, pushed) = msg.into_parts();
        if pushed.is_some() {
            push = pushed;
        }
        if let Some(h) = header {
            let shape: Vec<usize> = h.shape.iter().map(|&d| d as usize).collect();
            if shape != part.shape {
                return Err(Error::new(
                    ErrorKind::FailedPrecondition,
                    format!("{}: the shard holds shape {shape:?}, this client expects {:?}", ctx(), part.shape),
                ));
            }
            if h.wire_dtype != dtype_to_proto(wire) {
                return Err(Error::new(ErrorKind::Internal, format!("{}: {}", ctx(), crate::dataplane::wrong_wire(h.wire_dtype, wire))));
            }
            version = Some(h.version);
        }
        let n = parasync_tensor::decode_into(&data, wire, &mut dst[filled..])
            .map_err(|e| Error::new(ErrorKind::Internal, format!("{}: {e}", ctx())))?;
        filled += n;
    }
    match version {
        Some(v) if filled == dst.len() => Ok((v, push)),
        _ => Err(Error::new(ErrorKind::Internal, format!("{}: stream ended after {filled} of {} elements", ctx(), dst.len()))),
    }
}

fn check_sizes(model: &Model, sizes: impl ExactSizeIterator<Item = usize>) -> Result<()> {
    if sizes.len() != model.specs.len() {
        return Err(Error::usage(format!("{} tensors given for {} registered variables", sizes.len(), model.specs.len())));
    }
    for (n, s) in sizes.zip(&model.specs) {
        if n != s.len() {
            return Err(Error::usage(format!(
                "variable {:?} has shape {:?} ({} elements), the tensor given has {n}",
                s.name,
                s.shape,
                s.len()
            )));
        }
    }
    Ok(())
}

/// TLS settings from `PARASYNC_TLS_CA` (and `PARASYNC_TLS_CERT`, `PARASYNC_TLS_KEY`,
/// `PARASYNC_TLS_DOMAIN`); `None` when no CA is named.
fn tls_from_env() -> std::result::Result<Option<ClientTls>, String> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let Some(ca) = var("PARASYNC_TLS_CA") else { return Ok(None) };
    let (cert, key) = (var("PARASYNC_TLS_CERT"), var("PARASYNC_TLS_KEY"));
    let domain = var("PARASYNC_TLS_DOMAIN").map(|d| d.to_string_lossy().into_owned());
    ClientTls::from_files(ca.as_ref(), cert.as_deref().map(AsRef::as_ref), key.as_deref().map(AsRef::as_ref), domain)
        .map(Some)
        .map_err(|e| format!("PARASYNC_TLS_CA: {e}"))
}

/// `host` of a shard address (`host:port`, `[v6]:port`, with or without a scheme).
fn host_of(addr: &str) -> &str {
    let hostport = addr.split_once("://").map_or(addr, |(_, rest)| rest).trim_end_matches('/');
    hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
}

async fn connect_shard(index: usize, addr: &str, opts: &ClientOptions) -> Result<Shard> {
    let bare = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let uri = match (&opts.tls, addr.split_once("://").map(|(scheme, _)| scheme)) {
        (Some(_), Some("http")) => {
            return Err(Error::usage(format!("shard {index}: {addr:?} says http://, but TLS is configured (use https:// or a bare host:port)")))
        }
        (Some(_), _) => format!("https://{bare}"),
        (None, Some(_)) => addr.to_string(),
        (None, None) => format!("http://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(|e| Error::usage(format!("shard {index}: bad address {addr:?}: {e}")))?;
    if let Some(tls) = &opts.tls {
        endpoint = endpoint.tls_config(tls.grpc(host_of(addr))).map_err(|e| Error::usage(format!("shard {index}: TLS settings: {e}")))?;
    }
    let endpoint = endpoint
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .initial_stream_window_size(64 << 20)
        .initial_connection_window_size(256 << 20)
        .max_frame_size((1 << 24) - 1);
    let started = Instant::now();
    let mut conns = Vec::with_capacity(opts.connections_per_shard);
    let mut backoff = Duration::from_millis(20);
    while conns.len() < opts.connections_per_shard {
        match endpoint.connect().await {
            Ok(ch) => conns.push(
                ParameterServerClient::with_interceptor(ch, PresentToken(opts.auth_token.clone()))
                    // Replies are cut by the server's chunk size, not this client's: take
                    // whatever the shard sends (it is the data asked for).
                    .max_decoding_message_size(usize::MAX)
                    // The largest request: a chunk, or a registration with its values inline.
                    .max_encoding_message_size(grpc_request_limit(opts)),
            ),
            Err(e) if started.elapsed() < opts.connect_timeout => {
                tracing::debug!(shard = index, %addr, error = %e, "shard not reachable yet, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                // tonic's transport error says only "transport error": name its causes too
                // (connection refused, name not resolved, timed out).
                let mut why = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    why.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("shard {index} ({addr}) unreachable after {:?}: {why}", started.elapsed()),
                ));
            }
        }
    }
    let info = conns[0]
        .clone()
        .server_info(ps::ServerInfoRequest {})
        .await
        .map_err(|e| {
            let mut e = Error::from_status(e, &format!("server info of shard {index} ({addr})"));
            match &opts.tls {
                None if e.kind == ErrorKind::Unavailable => {
                    e.message.push_str(" (if the shard serves TLS, give this client its authority: ClientOptions::tls or PARASYNC_TLS_CA)")
                }
                Some(t) if e.kind == ErrorKind::Unavailable && !t.has_identity() => e.message.push_str(
                    " (if the shard requires client certificates, --tls-client-ca, give this client one: PARASYNC_TLS_CERT and PARASYNC_TLS_KEY)",
                ),
                _ => {}
            }
            e
        })?
        .into_inner();
    let data = match opts.data_plane {
        true => open_data_plane(index, addr, info.data_port, &conns[0], opts).await,
        false => None,
    };
    let incarnation = info.incarnation;
    Ok(Shard { addr: addr.to_string(), pool: Default::default(), conns, next: Default::default(), data, incarnation: incarnation.into() })
}

/// The shard's data plane, if it announces one and it can be reached; gRPC carries the
/// tensors otherwise (a warning says why).
async fn open_data_plane(index: usize, addr: &str, data_port: u32, rpc: &Rpc, opts: &ClientOptions) -> Option<DataPlane> {
    // The data plane listens on the host the client reached gRPC on.
    let host = host_of(addr).to_string();
    if data_port == 0 {
        return None;
    }
    let Some(sockaddr) = resolve_data_port(&host, data_port).await else {
        tracing::warn!(shard = index, %host, port = data_port, "cannot resolve the shard's data plane; tensors go over gRPC");
        return None;
    };
    let (rpc, host_again) = (rpc.clone(), host.clone());
    let resolve: crate::dataplane::Resolve = Box::new(move || {
        let (mut rpc, host) = (rpc.clone(), host_again.clone());
        Box::pin(async move {
            let port = rpc.server_info(ps::ServerInfoRequest {}).await.ok()?.into_inner().data_port;
            resolve_data_port(&host, port).await
        })
    });
    let tls = match &opts.tls {
        Some(t) => match t.server_name(&host) {
            Ok(name) => Some((t.connector(), name)),
            Err(e) => {
                tracing::warn!(shard = index, error = %e, "cannot use TLS on the shard's data plane; tensors go over gRPC");
                return None;
            }
        },
        None => None,
    };
    let access = crate::dataplane::Access { token: opts.auth_token.clone(), tls };
    match DataPlane::connect(sockaddr, resolve, opts.data_connections_per_shard, opts.reply_spin, access).await {
        Ok(plane) => {
            tracing::debug!(shard = index, addr = %plane.addr(), "using the shard's data plane");
            Some(plane)
        }
        Err(e) => {
            tracing::warn!(shard = index, %sockaddr, error = %e, "the shard's data plane is unreachable; tensors go over gRPC");
            None
        }
    }
}

/// `host:port` resolved, for a data port the shard announced (0: none).
async fn resolve_data_port(host: &str, port: u32) -> Option<std::net::SocketAddr> {
    if port == 0 {
        return None;
    }
    tokio::net::lookup_host(format!("{host}:{port}")).await.ok()?.next()
}

/// Parameter-server addresses from `TF_CONFIG` (`cluster.ps`), if it is set and not empty.
pub fn ps_addresses_from_env() -> Result<Option<Vec<String>>> {
    match std::env::var("TF_CONFIG") {
        Ok(s) if !s.trim().is_empty() => ps_addresses_from_tf_config(&s),
        _ => Ok(None),
    }
}

/// Parameter-server addresses from a `TF_CONFIG` document: `cluster.ps`, or `None` when the
/// cluster has no `ps` tasks.
pub fn ps_addresses_from_tf_config(json: &str) -> Result<Option<Vec<String>>> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| Error::usage(format!("TF_CONFIG is not valid JSON: {e}")))?;
    let ps = match v.pointer("/cluster/ps") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(ps) => ps,
    };
    let list = ps.as_array().ok_or_else(|| {
        Error::usage(format!(
            "TF_CONFIG cluster.ps must be a list of \"host:port\" strings in shard order, got {ps} \
             (the sparse form, a map from index to address, is not supported)"
        ))
    })?;
    let addrs = list
        .iter()
        .map(|x| x.as_str().map(String::from).ok_or_else(|| Error::usage(format!("TF_CONFIG cluster.ps holds {x}, not a \"host:port\" string"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(addrs))
}

/// Compile-time check: every call's future can move between threads (`tokio::spawn`).
#[allow(dead_code)]
fn futures_are_send(c: &'static Client, m: &'static mut Client, out: &'static mut [Vec<f32>]) {
    fn is_send<T: Send>(_: T) {}
    is_send(c.pull(0));
    is_send(c.push(0, &[]));
    is_send(c.push_pull(0, &[], out));
    is_send(m.register(Vec::new()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_config_gives_the_ps_addresses() {
        let tf = r#"{"cluster": {"worker": ["w0:1"], "ps": ["ps0:5000", "ps1:5000"]}, "task": {"type": "worker", "index": 0}}"#;
        assert_eq!(ps_addresses_from_tf_config(tf).unwrap(), Some(vec!["ps0:5000".to_string(), "ps1:5000".to_string()]));
        let no_ps = r#"{"cluster": {"worker": ["w0:1", "w1:1"]}, "task": {"type": "worker", "index": 1}}"#;
        assert_eq!(ps_addresses_from_tf_config(no_ps).unwrap(), None);
        let bad = ps_addresses_from_tf_config("{cluster").unwrap_err();
        assert_eq!(bad.kind, ErrorKind::Usage);
        assert!(bad.message.contains("not valid JSON"), "{bad}");
        let not_strings = ps_addresses_from_tf_config(r#"{"cluster": {"ps": ["ps0:5000", 7]}}"#).unwrap_err();
        assert!(not_strings.message.contains("holds 7"), "{not_strings}");
        let not_a_list = ps_addresses_from_tf_config(r#"{"cluster": {"ps": "ps0:5000"}}"#).unwrap_err();
        assert!(not_a_list.message.contains("must be a list"), "{not_a_list}");
        let sparse = ps_addresses_from_tf_config(r#"{"cluster": {"ps": {"0": "ps0:5000"}}}"#).unwrap_err();
        assert!(sparse.message.contains("sparse form"), "{sparse}");
        assert_eq!(ps_addresses_from_tf_config(r#"{"cluster": {"ps": null}}"#).unwrap(), None);
    }
}
