//! Parasync client: what a trainer calls once per step.
//!
//! ```no_run
//! # async fn demo() -> Result<(), parasync_client::Error> {
//! use parasync_client::{Client, ClientOptions, Optimizer, VariableSpec};
//! let addrs = vec!["127.0.0.1:7070".to_string(), "127.0.0.1:7071".to_string()];
//! let mut ps = Client::connect(&addrs, ClientOptions { worker_id: 0, ..Default::default() }).await?;
//! let mut w = VariableSpec::new("dense/w", &[784, 10]);
//! w.optimizer = Optimizer::sgd(0.1);
//! ps.register(vec![w]).await?;
//! for step in 0..100 {
//!     let params = ps.pull(step).await?;           // waits for `step` in sync mode
//!     let grad = vec![0.0f32; params[0].len()];    // … compute gradients …
//!     ps.push(step, &[&grad]).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! The API is free of transport types so that a C ABI and a Python binding can sit on it.

pub mod blocking;
mod client;
mod dataplane;
mod error;
pub mod placement;
mod sparse;
mod spec;

pub use blocking::BlockingClient;
pub use client::{ps_addresses_from_env, ps_addresses_from_tf_config, CheckpointFile, Client, ClientOptions, PartOutcome, PushSummary, ShardInfo, TableInfo};
pub use error::{Error, ErrorKind, Result};
pub use parasync_proto::auth::AuthToken;
pub use parasync_proto::tls::ClientTls;
pub use parasync_tensor::DType;
pub use sparse::{Admission, Eviction, RowInit, SparsePushSummary, TableOptimizer, TableSpec};
pub use spec::{Init, Optimizer, VariableSpec};
