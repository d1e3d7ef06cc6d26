//! The one error type of the crate.

/// Result of every fallible operation in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a collective operation, a rendezvous or a backend call failed.
///
/// Errors from an operation leave the communicator unusable ([`Error::Poisoned`] afterwards):
/// the byte streams between ranks are in an unknown state, so a new communicator must be
/// formed (a fresh rendezvous).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller passed something that cannot work (wrong buffer length, rank out of range).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The launcher's environment does not describe a job (missing or malformed variables).
    #[error("launch environment: {0}")]
    Env(String),
    /// Ranks could not meet: the host was unreachable, ranks were missing, or arguments clashed.
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    /// This process presented a job token that the job's rendezvous refused.
    #[error("job token refused: {0}")]
    TokenRefused(String),
    /// Ranks called different operations (or the same one with different arguments).
    #[error("operation mismatch at operation #{seq}: {detail}")]
    Mismatch {
        /// Sequence number of the operation on this rank.
        seq: u64,
        /// The rank whose call differs from this rank's.
        peer: usize,
        /// What differed, naming both calls.
        detail: String,
    },
    /// A rank did not send or receive within the operation's timeout.
    #[error("rank {peer} did not answer within {timeout_ms} ms during {op} (operation #{seq})")]
    Timeout {
        /// The rank this rank was waiting on.
        peer: usize,
        /// Sequence number of the operation.
        seq: u64,
        /// The operation, as called on this rank.
        op: String,
        /// The timeout that expired.
        timeout_ms: u64,
    },
    /// The connection to a rank closed or failed (the rank died or dropped its communicator).
    #[error("lost rank {peer} during {op} (operation #{seq}): {detail}")]
    PeerLost {
        /// The rank whose connection failed.
        peer: usize,
        /// Sequence number of the operation.
        seq: u64,
        /// The operation, as called on this rank.
        op: String,
        /// The underlying failure.
        detail: String,
    },
    /// Another rank failed first and told this rank so; `culprit` names the rank at fault.
    #[error("rank {from} aborted operation #{seq}: {reason}")]
    PeerAborted {
        /// The rank that sent the abort.
        from: usize,
        /// The rank the abort blames, when known.
        culprit: Option<usize>,
        /// Sequence number of the aborted operation.
        seq: u64,
        /// The first rank's error message.
        reason: String,
    },
    /// A rank sent bytes that are not a valid frame.
    #[error("protocol error from rank {peer}: {detail}")]
    Protocol {
        /// The rank that sent the bytes.
        peer: usize,
        /// What was wrong.
        detail: String,
    },
    /// An earlier operation failed; this communicator can no longer be used.
    #[error("communicator unusable after an earlier error: {0}")]
    Poisoned(String),
    /// A local I/O failure (binding, connecting, socket options).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The NCCL backend failed or is unavailable.
    #[error("NCCL backend: {0}")]
    Nccl(String),
}

impl Error {
    /// The rank this error blames, if any: the rank that timed out, died, differed, or the
    /// culprit named by an abort from another rank.
    pub fn culprit(&self) -> Option<usize> {
        match self {
            Error::Timeout { peer, .. } | Error::PeerLost { peer, .. } => Some(*peer),
            Error::Mismatch { peer, .. } | Error::Protocol { peer, .. } => Some(*peer),
            Error::PeerAborted { culprit, .. } => *culprit,
            _ => None,
        }
    }

    /// Sequence number of the failed operation, if the error comes from one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Error::Timeout { seq, .. }
            | Error::PeerLost { seq, .. }
            | Error::Mismatch { seq, .. }
            | Error::PeerAborted { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}
