//! Rust errors to Python exceptions, in one place. The classes live in
//! `parasync/_errors.py` (several have two bases, e.g. `PsTimeoutError` is also a
//! `TimeoutError`); messages are the Rust ones, unchanged.

use parasync_client::ErrorKind;
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// An instance of `parasync._errors.<class>` with `message`, plus attributes.
fn raise(py: Python<'_>, class: &str, message: String, attrs: &[(&str, Option<u64>)]) -> PyErr {
    let make = || -> PyResult<PyErr> {
        let module = ERRORS.get_or_try_init(py, || py.import("parasync._errors").map(Bound::unbind))?;
        let exc = module.bind(py).getattr(class)?.call1((message.clone(),))?;
        for (name, value) in attrs {
            exc.setattr(*name, *value)?;
        }
        Ok(PyErr::from_value(exc))
    };
    make().unwrap_or_else(|e| PyRuntimeError::new_err(format!("{message} (and raising it failed: {e})")))
}

/// An `auth_token` argument, checked (`ValueError` saying what is wrong); `None` when absent.
pub fn auth_token(token: Option<&str>) -> PyResult<Option<parasync_client::AuthToken>> {
    token.map(parasync_client::AuthToken::new).transpose().map_err(|e| PyValueError::new_err(format!("auth_token: {e}")))
}

/// A parameter-server client error. `Interrupted` becomes the pending signal's exception
/// when there is one (the caller passes it), else `KeyboardInterrupt`.
pub fn client_error(py: Python<'_>, e: parasync_client::Error, signal: Option<PyErr>) -> PyErr {
    let class = match e.kind {
        ErrorKind::Usage => return PyValueError::new_err(e.message),
        ErrorKind::Interrupted => return signal.unwrap_or_else(|| PyKeyboardInterrupt::new_err(e.message)),
        ErrorKind::Unavailable => "PsUnavailableError",
        ErrorKind::Timeout => "PsTimeoutError",
        ErrorKind::InvalidArgument => "PsInvalidArgumentError",
        ErrorKind::NotFound => "PsNotFoundError",
        ErrorKind::AlreadyExists => "PsAlreadyExistsError",
        ErrorKind::FailedPrecondition => "PsFailedPreconditionError",
        ErrorKind::OutOfRange => "PsOutOfRangeError",
        ErrorKind::Unauthenticated => "PsAuthenticationError",
        ErrorKind::Internal => "PsError",
    };
    raise(py, class, e.message, &[])
}

/// A collective error: every failure that blames a rank is a `PeerError` carrying `.rank`
/// and `.seq` (a `PeerTimeoutError`, also a `TimeoutError`, when the rank did not answer).
pub fn comm_error(py: Python<'_>, e: parasync_collective::Error) -> PyErr {
    use parasync_collective::Error as E;
    let message = e.to_string();
    let peer = |class: &str| raise(py, class, message.clone(), &[("rank", e.culprit().map(|r| r as u64)), ("seq", e.seq())]);
    match &e {
        E::InvalidArgument(_) => PyValueError::new_err(message),
        E::Timeout { .. } => peer("PeerTimeoutError"),
        E::Mismatch { .. } | E::PeerLost { .. } | E::PeerAborted { .. } | E::Protocol { .. } => peer("PeerError"),
        E::Env(_) => raise(py, "LaunchEnvironmentError", message, &[]),
        E::Rendezvous(_) | E::TokenRefused(_) => raise(py, "RendezvousError", message, &[]),
        E::Poisoned(_) => raise(py, "CommunicatorPoisonedError", message, &[]),
        E::Io(_) | E::Nccl(_) => raise(py, "ParasyncError", message, &[]),
    }
}
