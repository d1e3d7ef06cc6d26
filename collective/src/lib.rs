//! Parasync collectives: allreduce, broadcast, allgather, reduce_scatter and barrier between
//! the ranks of a job, over plain TCP (or NCCL on GPUs with the `nccl` feature).
//!
//! Layers, from pure to I/O:
//! - [`dtype`], [`frame`], [`schedule`]: element types and kernels, frame headers and their
//!   validation, the ring schedule — plain functions, table-tested;
//! - [`transport`]: moving validated frames between ranks (in-memory for tests, TCP);
//! - [`Communicator`]: numbering, timeouts, algorithm choice, fusion, poisoning on error;
//! - [`rendezvous`] and [`env`](mod@env): how ranks find each other (gRPC, launcher variables);
//! - [`bench`](mod@bench): the `allreduce-bench` table; `nccl` (feature `nccl`): the GPU backend.

#![warn(missing_docs)]

mod algo;
pub mod background;
pub mod bench;
pub mod comm;
pub mod dtype;
pub mod env;
pub mod error;
pub mod frame;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod schedule;
pub mod transport;

pub use background::{BackgroundCommunicator, Handle};
pub use comm::{Algorithm, CommConfig, Communicator};
pub use dtype::{Bf16, DType, Element, ReduceOp};
pub use error::{Error, Result};
pub use frame::OpKind;
pub use rendezvous::{
    connect, connect_hosting, connect_with_blob, ConnectOptions, JobTls, JoinSpec, RendezvousHost,
};
pub use transport::tcp::TcpOptions;
/// The shared secret of authenticated jobs (see [`JoinSpec::auth_token`]).
pub use parasync_proto::auth::AuthToken;
