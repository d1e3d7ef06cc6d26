//! Status codes, the calling thread's last error, and [`guard`], the wrapper every export
//! runs its body in (panics stop here; the error, if any, is recorded for
//! [`parasync_last_error`]).

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a call returned: `PARASYNC_STATUS_OK`, or why it failed (the message is in
/// `parasync_last_error()`).
///
/// A parameter-server call fails with one of the codes from `INVALID_ARGUMENT` to
/// `INTERNAL`, `UNAUTHENTICATED`, or with `USAGE`; a collective with `USAGE`, `PEER`, `RENDEZVOUS`, `ENV`,
/// `POISONED`, `IO` or `INTERNAL`. `PANIC` is a bug in this library.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParasyncStatus {
    /// Success.
    Ok = 0,
    /// The parameter server rejected the request as malformed (shape, dtype, non-finite
    /// values, a message over its size limit).
    InvalidArgument = 1,
    /// The variable does not exist on its shard.
    NotFound = 2,
    /// A registration conflicts with an existing variable.
    AlreadyExists = 3,
    /// The request does not fit the server's state (a duplicate gradient, ...).
    FailedPrecondition = 4,
    /// A step or version outside the range the server accepts.
    OutOfRange = 5,
    /// A wait on the parameter server ran out (a pull for a step that did not come).
    Timeout = 6,
    /// A parameter-server shard could not be reached, or went away.
    Unavailable = 7,
    /// The caller's arguments cannot work, found before anything was sent: a null pointer,
    /// lengths that do not match, an unknown dtype or operator, a rank out of range, a
    /// pull or push before registration.
    Usage = 8,
    /// A blocking call was abandoned (not returned by this version: C calls are not
    /// interruptible).
    Interrupted = 9,
    /// Anything else that went wrong, on the server or here.
    Internal = 10,
    /// A collective failed because of another rank: it did not answer in time, its
    /// connection was lost, it aborted the operation, it called a different operation, or it
    /// sent invalid bytes. `parasync_last_error_rank()` names the rank. The communicator
    /// is unusable afterwards.
    Peer = 11,
    /// Ranks could not meet: the rendezvous host was unreachable, ranks were missing,
    /// their arguments clashed, or the job token was refused.
    Rendezvous = 12,
    /// The launcher's environment variables do not describe a job.
    Env = 13,
    /// An earlier collective failed on this communicator; free it and form a new one.
    Poisoned = 14,
    /// A local I/O failure (binding or connecting a socket).
    Io = 15,
    /// A panic inside the library was caught at the boundary (a bug: please report it).
    Panic = 16,
    /// The parameter server requires an auth token and the client presented none, or a
    /// wrong one (`options.auth_token`, `PARASYNC_AUTH_TOKEN`).
    Unauthenticated = 17,
}

impl ParasyncStatus {
    /// Every status, in code order.
    const ALL: [ParasyncStatus; 18] = [
        ParasyncStatus::Ok,
        ParasyncStatus::InvalidArgument,
        ParasyncStatus::NotFound,
        ParasyncStatus::AlreadyExists,
        ParasyncStatus::FailedPrecondition,
        ParasyncStatus::OutOfRange,
        ParasyncStatus::Timeout,
        ParasyncStatus::Unavailable,
        ParasyncStatus::Usage,
        ParasyncStatus::Interrupted,
        ParasyncStatus::Internal,
        ParasyncStatus::Peer,
        ParasyncStatus::Rendezvous,
        ParasyncStatus::Env,
        ParasyncStatus::Poisoned,
        ParasyncStatus::Io,
        ParasyncStatus::Panic,
        ParasyncStatus::Unauthenticated,
    ];

    /// The constant's name in the header, NUL-terminated.
    fn name(self) -> &'static CStr {
        match self {
            ParasyncStatus::Ok => c"PARASYNC_STATUS_OK",
            ParasyncStatus::InvalidArgument => c"PARASYNC_STATUS_INVALID_ARGUMENT",
            ParasyncStatus::NotFound => c"PARASYNC_STATUS_NOT_FOUND",
            ParasyncStatus::AlreadyExists => c"PARASYNC_STATUS_ALREADY_EXISTS",
            ParasyncStatus::FailedPrecondition => c"PARASYNC_STATUS_FAILED_PRECONDITION",
            ParasyncStatus::OutOfRange => c"PARASYNC_STATUS_OUT_OF_RANGE",
            ParasyncStatus::Timeout => c"PARASYNC_STATUS_TIMEOUT",
            ParasyncStatus::Unavailable => c"PARASYNC_STATUS_UNAVAILABLE",
            ParasyncStatus::Usage => c"PARASYNC_STATUS_USAGE",
            ParasyncStatus::Interrupted => c"PARASYNC_STATUS_INTERRUPTED",
            ParasyncStatus::Internal => c"PARASYNC_STATUS_INTERNAL",
            ParasyncStatus::Peer => c"PARASYNC_STATUS_PEER",
            ParasyncStatus::Rendezvous => c"PARASYNC_STATUS_RENDEZVOUS",
            ParasyncStatus::Env => c"PARASYNC_STATUS_ENV",
            ParasyncStatus::Poisoned => c"PARASYNC_STATUS_POISONED",
            ParasyncStatus::Io => c"PARASYNC_STATUS_IO",
            ParasyncStatus::Panic => c"PARASYNC_STATUS_PANIC",
            ParasyncStatus::Unauthenticated => c"PARASYNC_STATUS_UNAUTHENTICATED",
        }
    }
}

/// A failed call as C sees it: a status, the message, and for collectives the rank at fault
/// and the operation's sequence number.
#[derive(Debug)]
pub(crate) struct Error {
    status: ParasyncStatus,
    message: String,
    rank: Option<usize>,
    seq: Option<u64>,
}

/// Result of every `_impl` function.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    fn new(status: ParasyncStatus, message: impl Into<String>) -> Error {
        Error { status, message: message.into(), rank: None, seq: None }
    }

    /// The caller passed something this binding cannot convert (null pointer, bad length,
    /// unknown enum value).
    pub(crate) fn usage(message: impl Into<String>) -> Error {
        Error::new(ParasyncStatus::Usage, message)
    }

    fn panic(payload: Box<dyn Any + Send>) -> Error {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        Error::new(ParasyncStatus::Panic, format!("panic inside parasync: {what}"))
    }

    /// The status this error is reported with.
    #[cfg(test)]
    pub(crate) fn status(&self) -> ParasyncStatus {
        self.status
    }
}

impl From<parasync_client::Error> for Error {
    fn from(e: parasync_client::Error) -> Error {
        use parasync_client::ErrorKind as K;
        let status = match e.kind {
            K::InvalidArgument => ParasyncStatus::InvalidArgument,
            K::NotFound => ParasyncStatus::NotFound,
            K::AlreadyExists => ParasyncStatus::AlreadyExists,
            K::FailedPrecondition => ParasyncStatus::FailedPrecondition,
            K::OutOfRange => ParasyncStatus::OutOfRange,
            K::Timeout => ParasyncStatus::Timeout,
            K::Unavailable => ParasyncStatus::Unavailable,
            K::Usage => ParasyncStatus::Usage,
            K::Interrupted => ParasyncStatus::Interrupted,
            K::Internal => ParasyncStatus::Internal,
            K::Unauthenticated => ParasyncStatus::Unauthenticated,
        };
        Error::new(status, e.message)
    }
}

impl From<parasync_collective::Error> for Error {
    fn from(e: parasync_collective::Error) -> Error {
        use parasync_collective::Error as E;
        let status = match &e {
            E::InvalidArgument(_) => ParasyncStatus::Usage,
            E::Env(_) => ParasyncStatus::Env,
            E::Rendezvous(_) | E::TokenRefused(_) => ParasyncStatus::Rendezvous,
            E::Mismatch { .. } | E::Timeout { .. } | E::PeerLost { .. } | E::PeerAborted { .. } | E::Protocol { .. } => {
                ParasyncStatus::Peer
            }
            E::Poisoned(_) => ParasyncStatus::Poisoned,
            E::Io(_) => ParasyncStatus::Io,
            E::Nccl(_) => ParasyncStatus::Internal,
        };
        Error { status, message: e.to_string(), rank: e.culprit(), seq: e.seq() }
    }
}

/// The calling thread's last error, kept for the `parasync_last_error*` getters.
struct LastError {
    /// `None` after a call that succeeded.
    message: Option<CString>,
    /// `-1` when none.
    rank: i64,
    /// `-1` when none.
    seq: i64,
}

impl LastError {
    const NONE: LastError = LastError { message: None, rank: -1, seq: -1 };
}

thread_local! {
    static LAST_ERROR: RefCell<LastError> = const { RefCell::new(LastError::NONE) };
}

fn record(e: Option<&Error>) {
    let last = match e {
        None => LastError::NONE,
        Some(e) => LastError {
            // A NUL inside the message would cut it short in C.
            message: CString::new(e.message.replace('\0', "\\0")).ok(),
            rank: e.rank.map_or(-1, |r| r as i64),
            seq: e.seq.map_or(-1, |s| s as i64),
        },
    };
    // (During thread teardown the slot may be gone; there is nobody left to ask then.)
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = last);
}

/// Runs an export's body: records its error (or clears the last one on success) and turns
/// a panic into [`ParasyncStatus::Panic`], so that no unwinding crosses into C.
pub(crate) fn guard(body: impl FnOnce() -> Result<()>) -> ParasyncStatus {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| Err(Error::panic(payload)));
    // Recording only moves plain data; it cannot unwind.
    match outcome {
        Ok(()) => {
            record(None);
            ParasyncStatus::Ok
        }
        Err(e) => {
            record(Some(&e));
            e.status
        }
    }
}

/// The message of the calling thread's last `parasync_*` call: empty (`""`, never NULL) when
/// that call succeeded or no call was made yet. The getters `parasync_last_error*` and
/// `parasync_status_name` do not count as calls.
///
/// The string belongs to the library and stays valid until the thread's next `parasync_*`
/// call (other than these getters) or its exit; copy it to keep it.
#[no_mangle]
pub extern "C" fn parasync_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| slot.borrow().message.as_ref().map_or(c"".as_ptr(), |m| m.as_ptr()))
        .unwrap_or(c"".as_ptr())
}

/// The rank at fault in the calling thread's last error, when it was a `PARASYNC_STATUS_PEER`
/// failure that names one (the rank that timed out, was lost, aborted, differed or sent
/// invalid bytes); `-1` otherwise.
#[no_mangle]
pub extern "C" fn parasync_last_error_rank() -> i64 {
    LAST_ERROR.try_with(|slot| slot.borrow().rank).unwrap_or(-1)
}

/// The sequence number (counting from 0 on each communicator) of the collective operation
/// that failed in the calling thread's last error, when it came from one; `-1` otherwise.
#[no_mangle]
pub extern "C" fn parasync_last_error_seq() -> i64 {
    LAST_ERROR.try_with(|slot| slot.borrow().seq).unwrap_or(-1)
}

/// The name of a status code, such as `"PARASYNC_STATUS_UNAVAILABLE"` (a static string);
/// `"PARASYNC_STATUS_UNKNOWN"` for a value that is not a status.
#[no_mangle]
pub extern "C" fn parasync_status_name(status: u32) -> *const c_char {
    ParasyncStatus::ALL
        .into_iter()
        .find(|s| *s as u32 == status)
        .map_or(c"PARASYNC_STATUS_UNKNOWN", ParasyncStatus::name)
        .as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> (String, i64, i64) {
        // SAFETY: parasync_last_error never returns NULL and the string lives until the next call.
        let msg = unsafe { CStr::from_ptr(parasync_last_error()) }.to_str().unwrap().to_string();
        (msg, parasync_last_error_rank(), parasync_last_error_seq())
    }

    #[test]
    fn the_last_error_describes_the_latest_call_on_this_thread() {
        assert_eq!(last(), (String::new(), -1, -1), "nothing called yet");
        let status = guard(|| Err(Error::usage("outs is null")));
        assert_eq!(status, ParasyncStatus::Usage);
        assert_eq!(last(), ("outs is null".to_string(), -1, -1));
        // Another thread has its own.
        std::thread::spawn(|| assert_eq!(last().0, "")).join().unwrap();
        assert_eq!(guard(|| Ok(())), ParasyncStatus::Ok);
        assert_eq!(last(), (String::new(), -1, -1), "a success clears it");
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = guard(|| panic!("boom {}", 7));
        assert_eq!(status, ParasyncStatus::Panic);
        assert_eq!(last().0, "panic inside parasync: boom 7");
        let status = guard(|| std::panic::panic_any(3u8));
        assert_eq!((status, last().0.as_str()), (ParasyncStatus::Panic, "panic inside parasync: (no message)"));
    }

    #[test]
    fn peer_errors_carry_the_rank_and_the_operation() {
        let e = parasync_collective::Error::Timeout { peer: 3, seq: 9, op: "allreduce".into(), timeout_ms: 50 };
        let message = e.to_string();
        assert_eq!(guard(|| Err(e.into())), ParasyncStatus::Peer);
        assert_eq!(last(), (message, 3, 9));
        let aborted = parasync_collective::Error::PeerAborted { from: 1, culprit: None, seq: 2, reason: "x".into() };
        assert_eq!(guard(|| Err(aborted.into())), ParasyncStatus::Peer);
        assert_eq!((last().1, last().2), (-1, 2), "an abort that blames nobody names no rank");
    }

    #[test]
    fn messages_pass_unchanged_and_nul_bytes_do_not_cut_them() {
        let e = parasync_client::Error { kind: parasync_client::ErrorKind::Unavailable, message: "shard 0 gone".into() };
        assert_eq!(guard(|| Err(e.into())), ParasyncStatus::Unavailable);
        assert_eq!(last().0, "shard 0 gone");
        guard(|| Err(Error::usage("a\0b")));
        assert_eq!(last().0, "a\\0b");
    }

    #[test]
    fn every_status_has_its_header_name() {
        for (code, s) in ParasyncStatus::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, code);
            // SAFETY: static NUL-terminated strings.
            let name = unsafe { CStr::from_ptr(parasync_status_name(code as u32)) }.to_str().unwrap();
            assert!(name.starts_with("PARASYNC_STATUS_") && name.len() > 16, "{name}");
        }
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(parasync_status_name(99)) };
        assert_eq!(unknown, c"PARASYNC_STATUS_UNKNOWN");
    }
}
