"""Auth tokens from Python: a shard started with ``--auth-token-file`` refuses a PsClient
without the token (``PsAuthenticationError``, also a ``PermissionError``) and serves one that
presents it, from the ``auth_token`` argument or ``PARASYNC_AUTH_TOKEN``; collective ranks
with a wrong token are refused by the rendezvous."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import parasync
from test_collectives import free_master

TOKEN = "py-s3cret-0123456789"


@pytest.fixture
def guarded(cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("PARASYNC_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("PARASYNC_AUTH_TOKEN_FILE", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    return cluster(mode="async", args=["--auth-token-file", str(token_file)])


def test_a_client_needs_the_shards_token(guarded, monkeypatch):
    addrs = guarded.addresses
    with pytest.raises(parasync.PsAuthenticationError, match="requires an auth token"):
        parasync.PsClient(addrs, timeout=10)
    with pytest.raises(PermissionError, match="wrong auth token"):
        parasync.PsClient(addrs, timeout=10, auth_token="a-guess")
    with pytest.raises(ValueError, match="auth_token: .*printable ASCII"):
        parasync.PsClient(addrs, timeout=10, auth_token="two words")

    init = np.arange(4, dtype=np.float32)
    with parasync.PsClient(addrs, timeout=10, auth_token=TOKEN) as c:
        c.register([parasync.VariableSpec("w", (4,), parasync.SGD(1.0), init=init)])
        c.push(0, {"w": np.ones(4, np.float32)})
        assert np.array_equal(c.pull(1)["w"], init - 1)
    # The same token from the environment.
    monkeypatch.setenv("PARASYNC_AUTH_TOKEN", TOKEN)
    with parasync.PsClient(addrs, timeout=10) as c:
        c.register([parasync.VariableSpec("w", (4,), parasync.SGD(1.0), init=init)])
        assert np.array_equal(c.pull(1)["w"], init - 1)


def _two_ranks(auth0: str | None, auth1: str | None, timeout: float) -> list:
    master = free_master()
    out: list = [None, None]

    def rank(r: int, auth: str | None) -> None:
        try:
            c = parasync.Communicator(r, 2, master, timeout=timeout, auth_token=auth)
            a = np.full(3, r + 1, np.float32)
            c.allreduce(a, "sum")
            c.close()
            out[r] = a
        except Exception as e:  # noqa: BLE001  (asserted by the caller)
            out[r] = e

    threads = [threading.Thread(target=rank, args=(r, a)) for r, a in ((0, auth0), (1, auth1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
        assert not t.is_alive(), "a rank hung"
    return out


def test_collective_ranks_need_the_jobs_token(monkeypatch):
    monkeypatch.delenv("PARASYNC_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("PARASYNC_AUTH_TOKEN_FILE", raising=False)
    ok = _two_ranks(TOKEN, TOKEN, 20)
    assert all(isinstance(a, np.ndarray) and np.array_equal(a, np.full(3, 3, np.float32)) for a in ok), ok
    host, joiner = _two_ranks(TOKEN, "a-guess", 3)
    assert isinstance(joiner, parasync.RendezvousError) and "wrong auth token" in str(joiner), joiner
    assert isinstance(host, parasync.RendezvousError) and "did not join" in str(host), host
