"""TLS from Python: a PsClient given the shards' certificate authority trains against shards
started with ``--tls-cert`` (over the data plane and over gRPC); a plain-text client gets
``PsUnavailableError`` quickly; bad TLS arguments are ``ValueError``s."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

import parasync


@pytest.fixture
def certs(server_bin, tmp_path):
    out = tmp_path / "certs"
    subprocess.run([server_bin, "tls-certs", "--out", str(out)], check=True, capture_output=True, timeout=60)
    return out


def test_a_client_with_the_authority_trains_over_tls(cluster, certs, monkeypatch):
    for var in ("PARASYNC_TLS_CA", "PARASYNC_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    cl = cluster(mode="async", args=["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server-key.pem")])
    init = np.arange(600, dtype=np.float32)
    for data_plane in (True, False):
        with parasync.PsClient(cl.addresses, timeout=10, data_plane=data_plane, tls_ca=certs / "ca.pem") as c:
            name = f"w{int(data_plane)}"
            c.register([parasync.VariableSpec(name, (600,), parasync.SGD(1.0), init=init)])
            c.push(0, {name: np.ones(600, np.float32)})
            assert np.array_equal(c.pull(1)[name], init - 1)
            assert (c.shard_info()[0]["data_plane"] is not None) == data_plane
    started = time.monotonic()
    with pytest.raises(parasync.PsUnavailableError):
        parasync.PsClient(cl.addresses, timeout=2)
    assert time.monotonic() - started < 15
    monkeypatch.setenv("PARASYNC_TLS_CA", str(certs / "ca.pem"))
    with parasync.PsClient(cl.addresses, timeout=10) as c:
        c.register([parasync.VariableSpec("w1", (600,), parasync.SGD(1.0), init=init)])


def test_bad_tls_arguments_are_value_errors(certs):
    with pytest.raises(ValueError, match="need tls_ca"):
        parasync.PsClient(["127.0.0.1:1"], tls_cert=certs / "client.pem")
    with pytest.raises(ValueError, match="tls_ca: .*holds no certificate"):
        parasync.PsClient(["127.0.0.1:1"], tls_ca=certs / "client-key.pem")
