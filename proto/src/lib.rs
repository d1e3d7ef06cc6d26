//! Generated protobuf messages and gRPC stubs of the Parasync protocol.
//!
//! Only the crates that convert to and from their own domain types use this crate
//! (`ps-server` and `client`); proto types never appear in their public APIs.

pub mod auth;
pub mod codec;
pub mod data;
pub mod names;
pub mod sparse;
pub mod tls;

/// `parasync.ps.v1`: the parameter-server service.
pub mod ps {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("parasync.ps.v1");
}

/// `parasync.collective.v1`: the rendezvous service of collective communicators.
pub mod collective {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("parasync.collective.v1");
}

/// Encoded `FileDescriptorSet` of every Parasync proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("parasync_descriptor");
