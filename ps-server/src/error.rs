//! The one error type of the parameter server, and its mapping to gRPC status codes.

use std::time::Duration;

use parasync_proto::names::Quoted;

use crate::consistency::PushRefusal;

/// A request the server could not carry out. Every variant names the variable involved;
/// none of them leaves a variable changed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No variable of that name is registered on this shard.
    #[error("variable {} is not registered on this shard", Quoted(.variable))]
    NotFound { variable: String },
    /// The request itself is malformed: shape, dtype, byte length, non-finite values, …
    #[error("variable {}: {reason}", Quoted(.variable))]
    InvalidArgument { variable: String, reason: String },
    /// The shard cannot take it: past its memory or size limits.
    #[error("variable {}: {reason}", Quoted(.variable))]
    ResourceExhausted { variable: String, reason: String },
    /// A registration that disagrees with the existing variable of the same name.
    #[error("variable {} is already registered with a different definition: {reason}", Quoted(.variable))]
    Conflict { variable: String, reason: String },
    /// The consistency mode refused the push (unknown worker, future step, duplicate).
    #[error("variable {}: {refusal}", Quoted(.variable))]
    Refused { variable: String, refusal: PushRefusal },
    /// A pull waited for its step longer than allowed.
    #[error(
        "variable {}: step {step} not reached after {waited:?} (variable is at version {version}); \
         waiting for gradients from worker(s) {missing:?}",
        Quoted(.variable)
    )]
    StepTimeout { variable: String, step: u64, version: u64, waited: Duration, missing: Vec<u32> },
    /// The variable's initial values are still to be assigned by the client that created it.
    #[error("variable {} is waiting for its initial values (registered with values to follow)", Quoted(.variable))]
    AwaitingValues { variable: String },
    /// A pull waited longer than allowed for the variable's initial values.
    #[error("variable {}: its initial values were not assigned within {waited:?}", Quoted(.variable))]
    ValuesTimeout { variable: String, waited: Duration },
    /// The server is shutting down and takes no new work.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Result alias of the server crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(variable: &str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { variable: variable.to_string(), reason: reason.into() }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let mut status = to_status(e);
        parasync_proto::codec::mark_service_status(&mut status);
        status
    }
}

/// The status of `e`, before it is marked as the service's own.
fn to_status(e: Error) -> tonic::Status {
    let msg = e.to_string();
    match e {
        Error::NotFound { .. } => tonic::Status::not_found(msg),
        Error::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
        Error::Conflict { .. } => tonic::Status::already_exists(msg),
        Error::ResourceExhausted { .. } => tonic::Status::resource_exhausted(msg),
        Error::Refused { refusal, .. } => match refusal {
            PushRefusal::UnknownWorker { .. } => tonic::Status::invalid_argument(msg),
            PushRefusal::FutureStep { .. } | PushRefusal::FutureVersion { .. } => {
                tonic::Status::out_of_range(msg)
            }
            PushRefusal::Duplicate { .. } => tonic::Status::failed_precondition(msg),
        },
        Error::StepTimeout { .. } | Error::ValuesTimeout { .. } => tonic::Status::deadline_exceeded(msg),
        Error::AwaitingValues { .. } => tonic::Status::failed_precondition(msg),
        Error::ShuttingDown => tonic::Status::unavailable(msg),
    }
}
