//! The model trained by `parasync demo`: the digits dataset and a 64-128-10 ReLU MLP.
//!
//! This module is pure computation — no tokio, no RPC. The demo pulls parameters from the
//! parameter server, calls [`mlp::loss_and_grads`] on a mini-batch of its shard, and pushes the
//! gradients back; everything here can be tested in a single process.

pub mod digits;
pub mod mlp;
