//! The Parasync parameter server.
//!
//! A shard holds named variables (`f32` or `bf16`), applies a server-side optimizer to the
//! gradients that workers push, and serves the current values to workers that pull. How
//! gradients from several workers combine is decided by one consistency mode per server
//! (`sync`, `async` or `bounded` staleness); those decisions live in the pure state
//! machines of [`consistency`], which the gRPC layer only feeds and obeys. Tensor bytes
//! may also travel over the plain-TCP [`dataplane`] beside gRPC, with the same semantics.

pub mod checkpoint;
pub mod config;
pub mod consistency;
pub mod convert;
pub mod dataplane;
pub mod error;
pub mod health;
pub mod metrics;
pub mod optimizer;
pub mod server;
pub mod service;
pub mod sparse;
pub mod store;

pub use error::{Error, Result};
