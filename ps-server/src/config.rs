//! Command-line flags of the server (each with an environment fallback), and reading the
//! cluster from `TF_CONFIG`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::consistency::Mode;
use parasync_proto::auth::AuthToken;
use parasync_proto::tls::ServerTls;

/// Consistency mode as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeName {
    /// Bulk-synchronous steps with k-of-n aggregation.
    Sync,
    /// Apply every gradient on arrival.
    Async,
    /// Async with a bound on how far workers drift apart.
    Bounded,
}

/// Flags of `ps-server` (and `parasync server`).
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on; defaults to this task's entry in TF_CONFIG (task type `ps`), else 127.0.0.1:7070.
    #[arg(long, env = "PARASYNC_LISTEN")]
    pub listen: Option<String>,
    /// Index of this shard among the parameter servers; defaults to TF_CONFIG's task index, else 0.
    #[arg(long, env = "PARASYNC_SHARD_INDEX")]
    pub shard_index: Option<u32>,
    /// Consistency mode.
    #[arg(long, env = "PARASYNC_MODE", value_enum, default_value = "sync")]
    pub mode: ModeName,
    /// Workers in the job; defaults to TF_CONFIG's chief + worker count, else 1.
    #[arg(long, env = "PARASYNC_NUM_WORKERS")]
    pub num_workers: Option<u32>,
    /// Sync mode: gradients that complete a step (k of n); defaults to all workers.
    #[arg(long, env = "PARASYNC_REPLICAS_TO_AGGREGATE")]
    pub replicas_to_aggregate: Option<u32>,
    /// Bounded mode: how many steps the fastest worker may run ahead of the slowest.
    #[arg(long, env = "PARASYNC_MAX_STALENESS", default_value_t = 2)]
    pub max_staleness: u64,
    /// Async and bounded modes: divide the learning rate by each gradient's staleness.
    #[arg(long, env = "PARASYNC_LR_STALENESS_SCALING")]
    pub lr_staleness_scaling: bool,
    /// How long a pull may wait for its step, in milliseconds, unless the request says.
    #[arg(long, env = "PARASYNC_PULL_TIMEOUT_MS", default_value_t = 30_000)]
    pub pull_timeout_ms: u64,
    /// Accept NaN and infinite gradients instead of rejecting them.
    #[arg(long, env = "PARASYNC_ALLOW_NON_FINITE")]
    pub allow_non_finite: bool,
    /// Bytes of gradient buffers kept for reuse, over all variables: a large push into a
    /// reused buffer skips the page faults of a fresh one. 0 keeps none.
    #[arg(long, env = "PARASYNC_SPARE_BUFFER_BYTES", default_value_t = crate::store::DEFAULT_SPARE_BUFFER_BYTES)]
    pub spare_buffer_bytes: usize,
    /// Most memory this shard's variables and optimizer slots may hold (bytes, or with a
    /// KiB/MiB/GiB/TiB suffix); a registration past it is refused with `resource_exhausted`
    /// before anything is allocated. Default: the machine's physical memory.
    #[arg(long, env = "PARASYNC_MAX_SHARD_BYTES", value_parser = parse_bytes)]
    pub max_shard_bytes: Option<u64>,
    /// Most elements one variable part may have on this shard (the client splits larger
    /// variables into parts).
    #[arg(long, env = "PARASYNC_MAX_VARIABLE_ELEMENTS", default_value_t = crate::store::MAX_ELEMENTS)]
    pub max_variable_elements: u64,
    /// Address of the Prometheus endpoint (`GET /metrics`); none when unset.
    #[arg(long, env = "PARASYNC_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Largest data slice of one streamed message, in bytes.
    #[arg(long, env = "PARASYNC_CHUNK_BYTES", default_value_t = 1 << 20)]
    pub chunk_bytes: usize,
    /// On SIGTERM, how long in-flight calls may take to finish before connections are closed (ms).
    #[arg(long, env = "PARASYNC_DRAIN_TIMEOUT_MS", default_value_t = 5_000)]
    pub drain_timeout_ms: u64,
    /// Threads serving requests; 0 runs everything on one event-loop thread (lowest latency
    /// for small calls; large updates still go to the blocking pool).
    #[arg(long, env = "PARASYNC_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
    /// Largest gRPC message accepted, in bytes (a client's chunks must stay below it).
    #[arg(long, env = "PARASYNC_MAX_MESSAGE_BYTES", default_value_t = 16 << 20)]
    pub max_message_bytes: usize,
    /// Address of the data plane (tensor bytes over plain TCP, announced to clients in
    /// server info); defaults to the gRPC address's host with a free port; `off` disables it.
    #[arg(long, env = "PARASYNC_DATA_LISTEN")]
    pub data_listen: Option<String>,
    /// Data-plane connections open at once; past it, new ones are closed at once (and
    /// counted as rejected). Each worker opens up to 8 per shard.
    #[arg(long, env = "PARASYNC_DATA_MAX_CONNECTIONS", default_value_t = 4096)]
    pub data_max_connections: usize,
    /// Seconds a data-plane connection may stay without a request before the shard closes
    /// it (clients open a new one when they need it).
    #[arg(long, env = "PARASYNC_DATA_IDLE_TIMEOUT_S", default_value_t = 300.0)]
    pub data_idle_timeout_s: f64,
    /// Number of shards of the job (default: the `ps` tasks of `TF_CONFIG`, else the shard
    /// count of the checkpoint restored). Restoring onto another shard count needs it.
    #[arg(long, env = "PARASYNC_NUM_SHARDS")]
    pub num_shards: Option<u32>,
    /// Folder of checkpoints (`DIR/step-<n>/`, a safetensors file and a JSON manifest per
    /// shard). All shards of a job must see the same folder to restore onto another count.
    #[arg(long, env = "PARASYNC_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Write a checkpoint every this many steps (sync: completed steps; async / bounded: the
    /// workers' steps). 0: only when a client asks for one.
    #[arg(long, env = "PARASYNC_CHECKPOINT_EVERY_STEPS", default_value_t = 0)]
    pub checkpoint_every_steps: u64,
    /// Write a checkpoint about every this many seconds. Shards agree on what they write
    /// through the workers: a shard that is due names a step in its push replies, the
    /// workers pass it on with their next pushes to every shard, and each shard writes that
    /// step (sync: the state the step leaves; async / bounded: every variable and table as
    /// the first such push finds it). 0: off.
    #[arg(long, env = "PARASYNC_CHECKPOINT_EVERY_S", default_value_t = 0.0, conflicts_with = "checkpoint_every_steps")]
    pub checkpoint_every_s: f64,
    /// Checkpoints kept (the newest); older ones are removed.
    #[arg(long, env = "PARASYNC_KEEP_CHECKPOINTS", default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Start from a checkpoint: `latest` (the newest complete one in --checkpoint-dir whose
    /// checksums match; none there starts empty) or a path (a `step-<n>` folder, or a folder
    /// of them).
    #[arg(long, env = "PARASYNC_RESTORE")]
    pub restore: Option<String>,
    /// File holding the shared secret every call and data-plane connection must present
    /// (health checks excepted); without it, `PARASYNC_AUTH_TOKEN` gives the token itself.
    /// Neither: no authentication.
    #[arg(long, env = "PARASYNC_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<std::path::PathBuf>,
    /// PEM certificate chain (leaf first): serve gRPC and the data plane over TLS.
    #[arg(long, env = "PARASYNC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "PARASYNC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM certificate authority that clients' certificates must chain to: with it, every
    /// client must present a certificate (mutual TLS).
    #[arg(long, env = "PARASYNC_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

/// Everything the server needs, resolved from flags and the environment.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Address to bind.
    pub listen: String,
    /// Shard index.
    pub shard_index: u32,
    /// Consistency mode with its parameters.
    pub mode: Mode,
    /// See [`ServerArgs::pull_timeout_ms`].
    pub pull_timeout: Duration,
    /// See [`ServerArgs::allow_non_finite`].
    pub allow_non_finite: bool,
    /// See [`ServerArgs::spare_buffer_bytes`].
    pub spare_buffer_bytes: usize,
    /// See [`ServerArgs::max_shard_bytes`] (resolved: the physical memory by default).
    pub max_shard_bytes: u64,
    /// See [`ServerArgs::max_variable_elements`].
    pub max_variable_elements: u64,
    /// See [`ServerArgs::metrics_listen`].
    pub metrics_listen: Option<String>,
    /// See [`ServerArgs::chunk_bytes`].
    pub chunk_bytes: usize,
    /// See [`ServerArgs::max_message_bytes`].
    pub max_message_bytes: usize,
    /// See [`ServerArgs::drain_timeout_ms`].
    pub drain_timeout: Duration,
    /// See [`ServerArgs::worker_threads`].
    pub worker_threads: usize,
    /// Where the data plane listens; `None` when disabled.
    pub data_listen: Option<String>,
    /// See [`ServerArgs::data_max_connections`] and [`ServerArgs::data_idle_timeout_s`].
    pub data_limits: crate::dataplane::Limits,
    /// See [`ServerArgs::num_shards`] (`None`: not given).
    pub num_shards: Option<u32>,
    /// See [`ServerArgs::checkpoint_dir`].
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// See [`ServerArgs::checkpoint_every_steps`].
    pub checkpoint_every_steps: u64,
    /// See [`ServerArgs::checkpoint_every_s`] (`None`: off).
    pub checkpoint_every: Option<std::time::Duration>,
    /// See [`ServerArgs::keep_checkpoints`].
    pub keep_checkpoints: usize,
    /// See [`ServerArgs::restore`].
    pub restore: Option<String>,
    /// See [`ServerArgs::auth_token_file`] (`None`: calls need no token).
    pub auth_token: Option<AuthToken>,
    /// See [`ServerArgs::tls_cert`] (`None`: plain TCP).
    pub tls: Option<ServerTls>,
}

/// The parts of `TF_CONFIG` Parasync reads.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TfConfig {
    /// Task type → addresses (`chief`, `worker`, `ps`, `evaluator`).
    pub cluster: BTreeMap<String, Vec<String>>,
    /// This process's role.
    pub task: TfTask,
}

/// This process's entry in `TF_CONFIG`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TfTask {
    /// Task type, e.g. `ps` or `worker`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Index within that task type.
    pub index: u32,
}

impl TfConfig {
    /// Parses a `TF_CONFIG` JSON document.
    pub fn parse(json: &str) -> anyhow::Result<TfConfig> {
        serde_json::from_str(json).context("TF_CONFIG is not valid JSON of the form {\"cluster\": {...}, \"task\": {\"type\": ..., \"index\": ...}}")
    }

    /// Reads `TF_CONFIG` from the environment, if set.
    pub fn from_env() -> anyhow::Result<Option<TfConfig>> {
        match std::env::var("TF_CONFIG") {
            Ok(s) if !s.trim().is_empty() => Ok(Some(Self::parse(&s)?)),
            _ => Ok(None),
        }
    }

    /// Workers that train: chief plus workers.
    pub fn num_workers(&self) -> u32 {
        let n = |k: &str| self.cluster.get(k).map_or(0, Vec::len) as u32;
        n("chief") + n("worker")
    }
}

impl ServerArgs {
    /// Resolves flags against `TF_CONFIG` (passed in, so tests need no environment).
    pub fn resolve(&self, tf: Option<&TfConfig>) -> anyhow::Result<ServerSettings> {
        let ps_task = tf.filter(|t| t.task.kind == "ps");
        if let (Some(t), None) = (tf, ps_task) {
            if self.listen.is_none() {
                bail!("TF_CONFIG names this task {:?}, not \"ps\": pass --listen to run a server here", t.task.kind);
            }
        }
        let listen = match (&self.listen, ps_task) {
            (Some(l), _) => l.clone(),
            (None, Some(t)) => {
                let entry = t.cluster.get("ps").and_then(|ps| ps.get(t.task.index as usize)).with_context(|| {
                    format!("TF_CONFIG has no cluster.ps[{}] for this task", t.task.index)
                })?;
                // Bind every interface on the port the cluster spec names for this task.
                let port = entry.rsplit_once(':').map(|(_, p)| p).context("TF_CONFIG ps entry has no port")?;
                format!("0.0.0.0:{port}")
            }
            (None, None) => "127.0.0.1:7070".into(),
        };
        let shard_index = self.shard_index.or(ps_task.map(|t| t.task.index)).unwrap_or(0);
        let num_workers = self.num_workers.or(tf.map(TfConfig::num_workers).filter(|&n| n > 0)).unwrap_or(1);
        let mode = match self.mode {
            ModeName::Sync => Mode::Sync {
                num_workers,
                replicas_to_aggregate: self.replicas_to_aggregate.unwrap_or(num_workers),
            },
            ModeName::Async => Mode::Async { num_workers, lr_div_staleness: self.lr_staleness_scaling },
            ModeName::Bounded => Mode::Bounded {
                num_workers,
                max_staleness: self.max_staleness,
                lr_div_staleness: self.lr_staleness_scaling,
            },
        };
        mode.validate().map_err(anyhow::Error::msg)?;
        if self.data_max_connections == 0 {
            bail!("--data-max-connections must be at least 1");
        }
        if !(self.data_idle_timeout_s.is_finite() && self.data_idle_timeout_s > 0.0) {
            bail!("--data-idle-timeout-s must be a number of seconds > 0, got {}", self.data_idle_timeout_s);
        }
        if self.max_variable_elements == 0 {
            bail!("--max-variable-elements must be at least 1");
        }
        if self.chunk_bytes < 1024 || self.chunk_bytes + 4096 > self.max_message_bytes {
            bail!("--chunk-bytes must be at least 1024 and leave 4 KiB below --max-message-bytes");
        }
        let data_listen = match self.data_listen.as_deref() {
            Some("off") => None,
            Some(a) => Some(a.to_string()),
            None => {
                let host = listen.rsplit_once(':').map_or(listen.as_str(), |(h, _)| h);
                Some(format!("{host}:0"))
            }
        };
        if self.restore.as_deref() == Some("latest") && self.checkpoint_dir.is_none() {
            bail!("--restore latest needs --checkpoint-dir");
        }
        if self.checkpoint_every_steps > 0 && self.checkpoint_dir.is_none() {
            bail!("--checkpoint-every-steps needs --checkpoint-dir");
        }
        if !(self.checkpoint_every_s.is_finite() && self.checkpoint_every_s >= 0.0) {
            bail!("--checkpoint-every-s must be a number of seconds ≥ 0, got {}", self.checkpoint_every_s);
        }
        if self.checkpoint_every_s > 0.0 && self.checkpoint_dir.is_none() {
            bail!("--checkpoint-every-s needs --checkpoint-dir");
        }
        let num_shards = self.num_shards.or(tf.and_then(|t| t.cluster.get("ps")).map(|ps| ps.len() as u32).filter(|&n| n > 0));
        if let Some(n) = num_shards {
            if shard_index >= n {
                bail!("shard index {shard_index} is not below the {n} shards of the job");
            }
        }
        let auth_token = match &self.auth_token_file {
            Some(path) => Some(AuthToken::from_file(path).map_err(anyhow::Error::msg)?),
            None => AuthToken::from_lookup(|k| (k == parasync_proto::auth::ENV_TOKEN).then(|| std::env::var(k).ok()).flatten())
                .map_err(anyhow::Error::msg)?,
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls::from_files(cert, key, self.tls_client_ca.as_deref()).map_err(anyhow::Error::msg)?),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together"),
        };
        Ok(ServerSettings {
            tls,
            auth_token,
            num_shards,
            checkpoint_dir: self.checkpoint_dir.clone(),
            checkpoint_every_steps: self.checkpoint_every_steps,
            checkpoint_every: (self.checkpoint_every_s > 0.0).then(|| std::time::Duration::from_secs_f64(self.checkpoint_every_s)),
            keep_checkpoints: self.keep_checkpoints.max(1),
            restore: self.restore.clone(),
            data_listen,
            data_limits: crate::dataplane::Limits {
                max_connections: self.data_max_connections,
                idle_timeout: Duration::from_secs_f64(self.data_idle_timeout_s),
            },
            listen,
            shard_index,
            mode,
            pull_timeout: Duration::from_millis(self.pull_timeout_ms),
            allow_non_finite: self.allow_non_finite,
            spare_buffer_bytes: self.spare_buffer_bytes,
            max_shard_bytes: self.max_shard_bytes.unwrap_or_else(physical_memory),
            max_variable_elements: self.max_variable_elements,
            metrics_listen: self.metrics_listen.clone(),
            chunk_bytes: self.chunk_bytes,
            max_message_bytes: self.max_message_bytes,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            worker_threads: self.worker_threads,
        })
    }
}

/// Parses a byte count: digits, optionally followed by B, KiB, MiB, GiB or TiB.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, mult) = [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)]
        .into_iter()
        .find_map(|(unit, m)| t.strip_suffix(unit).map(|d| (d.trim(), m)))
        .unwrap_or((t, 1));
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a byte count (e.g. 17179869184, 16GiB, 512MiB)"))
}

/// The machine's physical memory in bytes (unlimited when the system does not say).
fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64)
    } else {
        u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServerArgs,
    }

    fn args(v: &[&str]) -> ServerArgs {
        Cli::parse_from(std::iter::once("ps-server").chain(v.iter().copied())).args
    }

    const TF: &str = r#"{"cluster": {"chief": ["c:1"], "worker": ["w0:2", "w1:2", "w2:2"], "ps": ["p0:2222", "p1:2223"]},
                         "task": {"type": "ps", "index": 1}}"#;

    #[test]
    fn tf_config_supplies_listen_shard_and_workers() {
        let tf = TfConfig::parse(TF).unwrap();
        let s = args(&[]).resolve(Some(&tf)).unwrap();
        assert_eq!(s.listen, "0.0.0.0:2223");
        assert_eq!(s.data_listen.as_deref(), Some("0.0.0.0:0"), "the data plane follows the gRPC host");
        assert_eq!(s.shard_index, 1);
        assert_eq!(s.mode, Mode::Sync { num_workers: 4, replicas_to_aggregate: 4 });
    }

    #[test]
    fn flags_override_tf_config() {
        let tf = TfConfig::parse(TF).unwrap();
        let s = args(&["--listen", "127.0.0.1:0", "--shard-index", "0", "--num-workers", "2", "--mode", "bounded", "--max-staleness", "3"])
            .resolve(Some(&tf))
            .unwrap();
        assert_eq!((s.listen.as_str(), s.shard_index), ("127.0.0.1:0", 0));
        let off = args(&["--data-listen", "off"]).resolve(None).unwrap();
        assert_eq!(off.data_listen, None);
        let fixed = args(&["--data-listen", "[::1]:7071"]).resolve(None).unwrap();
        assert_eq!(fixed.data_listen.as_deref(), Some("[::1]:7071"));
        assert_eq!(s.mode, Mode::Bounded { num_workers: 2, max_staleness: 3, lr_div_staleness: false });
    }

    #[test]
    fn bad_settings_are_explained() {
        let tf = TfConfig::parse(r#"{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}"#).unwrap();
        assert!(args(&[]).resolve(Some(&tf)).unwrap_err().to_string().contains("not \"ps\""));
        let e = args(&["--num-workers", "2", "--replicas-to-aggregate", "3"]).resolve(None).unwrap_err();
        assert!(e.to_string().contains("replicas_to_aggregate"), "{e}");
        assert!(TfConfig::parse("{").is_err());
    }

    #[test]
    fn time_based_checkpoints_need_a_folder_and_exclude_step_based_ones() {
        let e = args(&["--checkpoint-every-s", "30"]).resolve(None).unwrap_err();
        assert!(e.to_string().contains("needs --checkpoint-dir"), "{e}");
        let e = args(&["--checkpoint-dir", "/tmp/x", "--checkpoint-every-s=-1"]).resolve(None).unwrap_err();
        assert!(e.to_string().contains("≥ 0"), "{e}");
        let both = ["ps-server", "--checkpoint-dir", "/tmp/x", "--checkpoint-every-s", "30", "--checkpoint-every-steps", "5"];
        let e = Cli::try_parse_from(both).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let s = args(&["--checkpoint-dir", "/tmp/x", "--checkpoint-every-s", "0.5"]).resolve(None).unwrap();
        assert_eq!(s.checkpoint_every, Some(std::time::Duration::from_millis(500)));
        assert_eq!(args(&[]).resolve(None).unwrap().checkpoint_every, None);
    }
}
