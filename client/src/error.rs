//! The client's one error type. It names the shard and variable involved and carries a
//! [`ErrorKind`] instead of transport types, so C and Python bindings can map it.

use std::fmt;

/// What kind of failure, independent of the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A shard could not be reached (within the connect budget) or went away.
    Unavailable,
    /// The server rejected the request as malformed (shape, dtype, non-finite values, …).
    InvalidArgument,
    /// The variable does not exist on its shard.
    NotFound,
    /// A registration conflicts with an existing variable.
    AlreadyExists,
    /// The request does not fit the server's state (duplicate gradient, …).
    FailedPrecondition,
    /// A step or version outside the accepted range.
    OutOfRange,
    /// A wait (pull for a step, call deadline) ran out.
    Timeout,
    /// The caller's input is inconsistent (detected before anything was sent).
    Usage,
    /// The caller abandoned a blocking call (see [`crate::blocking`]).
    Interrupted,
    /// The server wants an auth token this client did not present, or presented wrong.
    Unauthenticated,
    /// Anything else the server reported.
    Internal,
}

/// A failed client call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// Category of the failure.
    pub kind: ErrorKind,
    /// What happened, naming the shard and variable.
    pub message: String,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }

    pub(crate) fn from_status(status: tonic::Status, context: &str) -> Self {
        use tonic::Code;
        let kind = match status.code() {
            // (resource_exhausted: a message over the server's size limit)
            Code::InvalidArgument | Code::ResourceExhausted => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::OutOfRange if parasync_proto::codec::is_oversized_message(&status) => {
                return Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{context}: {} (raise the server's --max-message-bytes, or lower chunk_bytes)", status.message()),
                );
            }
            Code::OutOfRange => ErrorKind::OutOfRange,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Unauthenticated,
            Code::Unavailable | Code::Cancelled => ErrorKind::Unavailable,
            // tonic's "transport error": the connection broke under the call (the status
            // carries the transport's error as its source; a server's status has none).
            Code::Unknown | Code::Internal if std::error::Error::source(&status).is_some() => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        };
        // A transport error says only "transport error": name its causes too (a refused
        // TLS handshake, a certificate the client does not trust, a reset connection).
        let mut message = format!("{context}: {}", status.message());
        let mut cause = std::error::Error::source(&status);
        let mut last = status.message().to_string();
        while let Some(c) = cause {
            let text = c.to_string();
            if text != last {
                message.push_str(&format!(": {text}"));
            }
            last = text;
            cause = c.source();
        }
        Error::new(kind, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Result alias of the client crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds_and_an_oversized_message_says_what_to_change() {
        let big = tonic::Status::out_of_range("Error, decoded message length too large: found 10240 bytes, the limit is: 8192 bytes");
        let e = Error::from_status(big, "register \"w\"");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.starts_with("register \"w\": Error, decoded message length too large"), "{e}");
        assert!(e.message.contains("--max-message-bytes"), "{e}");
        let mut ahead = tonic::Status::out_of_range("step 9 is ahead");
        parasync_proto::codec::mark_service_status(&mut ahead); // as the server sends it
        let step = Error::from_status(ahead, "pull");
        assert_eq!((step.kind, step.message.as_str()), (ErrorKind::OutOfRange, "pull: step 9 is ahead"));
        // the size check does not depend on tonic's wording
        let reworded = Error::from_status(tonic::Status::out_of_range("message exceeds 8192 bytes"), "push");
        assert_eq!(reworded.kind, ErrorKind::InvalidArgument, "{reworded}");
        let limit = Error::from_status(tonic::Status::resource_exhausted("a chunk is larger than this server accepts"), "push");
        assert_eq!(limit.kind, ErrorKind::InvalidArgument);
    }
}
