//! The C ABI of Parasync: the parameter-server client (`ParasyncPsClient`) and the
//! collectives (`ParasyncComm`) behind opaque handles. The header, `include/parasync.h`, is
//! generated from this crate by cbindgen (see `tests/header.rs`).
//!
//! Conventions, the same for every function:
//! - it returns a `ParasyncStatus`; on failure `parasync_last_error()` holds the message (the
//!   Rust error's, unchanged) and, for a collective, `parasync_last_error_rank()` the rank at
//!   fault;
//! - results go through out-pointers, and handles are created by `*_connect` and released by
//!   `*_free` (NULL-tolerant);
//! - NULL pointers, lengths that do not match, overlapping output buffers and unknown enum
//!   values are reported as `PARASYNC_STATUS_USAGE`, never undefined behaviour; a panic is
//!   caught at the boundary (`PARASYNC_STATUS_PANIC`);
//! - tensors are the caller's memory, read and written in place during the call only.
//!
//! Each export is a thin `extern "C"` wrapper around an `_impl` function that returns a
//! `Result`; [`error::guard`] between them records the error and stops panics. The bindings
//! only convert and map errors: everything else is `parasync-client`'s and
//! `parasync-collective`'s.

mod args;
pub mod comm;
pub mod dtype;
pub mod error;
pub mod ps;

pub use comm::*;
pub use dtype::*;
pub use error::{parasync_last_error, parasync_last_error_rank, parasync_last_error_seq, parasync_status_name, ParasyncStatus};
pub use ps::*;
