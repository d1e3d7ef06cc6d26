"""Exceptions raised by Parasync. The native module raises these classes; messages are the
Rust ones, unchanged."""

from __future__ import annotations


class ParasyncError(Exception):
    """Base class of every error Parasync raises (besides ValueError / TypeError for a
    caller's mistake detected before anything is sent, and KeyboardInterrupt)."""


# -- parameter server ---------------------------------------------------------------------


class PsError(ParasyncError):
    """A parameter-server call failed."""


class PsUnavailableError(PsError, ConnectionError):
    """A shard could not be reached, or went away."""


class PsTimeoutError(PsError, TimeoutError):
    """A wait ran out: a pull for a step that did not complete, a call deadline."""


class PsInvalidArgumentError(PsError, ValueError):
    """The server refused the request as malformed (non-finite values, oversized message…)."""


class PsNotFoundError(PsError, LookupError):
    """The variable does not exist on its shard."""


class PsAlreadyExistsError(PsError):
    """A registration conflicts with an existing variable."""


class PsFailedPreconditionError(PsError):
    """The request does not fit the server's state (a duplicate gradient, …)."""


class PsOutOfRangeError(PsError):
    """A step or version outside the accepted range."""


class PsAuthenticationError(PsError, PermissionError):
    """The shards require an auth token and this client presented none, or a wrong one."""


# -- collectives --------------------------------------------------------------------------


class PeerError(ParasyncError):
    """Another rank failed: it died, did not answer, or called a different operation.

    ``rank`` is the rank at fault (None when unknown), ``seq`` the operation's sequence
    number. The communicator cannot be used afterwards: form a new one.
    """

    rank: int | None = None
    seq: int | None = None


class PeerTimeoutError(PeerError, TimeoutError):
    """A rank did not answer within the operation's timeout."""


class RendezvousError(ParasyncError, ConnectionError):
    """Ranks could not meet (unreachable master, missing ranks, a refused job token)."""


class LaunchEnvironmentError(ParasyncError):
    """The launcher's environment does not describe a job."""


class CommunicatorPoisonedError(ParasyncError):
    """An earlier operation failed; this communicator can no longer be used."""


__all__ = [
    "ParasyncError",
    "PsError",
    "PsUnavailableError",
    "PsTimeoutError",
    "PsInvalidArgumentError",
    "PsNotFoundError",
    "PsAlreadyExistsError",
    "PsFailedPreconditionError",
    "PsOutOfRangeError",
    "PsAuthenticationError",
    "PeerError",
    "PeerTimeoutError",
    "RendezvousError",
    "LaunchEnvironmentError",
    "CommunicatorPoisonedError",
]
