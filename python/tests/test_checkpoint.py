"""Checkpoints from Python: PsClient.checkpoint, and the files read with the `safetensors`
package alone, as a user without Parasync would."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

import parasync


def _specs():
    return [
        parasync.VariableSpec("emb", (64, 33), parasync.Adam(0.01), init=parasync.Uniform(-1, 1, seed=5)),
        parasync.VariableSpec("head", (33, 10), parasync.SGD(0.1, momentum=0.9), init=parasync.Normal(0, 0.1, seed=2),
                              dtype="bf16"),
        parasync.VariableSpec("bias", (10,), parasync.Adam(0.02), init=parasync.Constant(0.5)),
    ]


def _train(c: parasync.PsClient, steps: int) -> dict[str, np.ndarray]:
    values = c.pull(0)
    for step in range(steps):
        grads = [np.sin(values[s.name] * np.float32(1.3) + np.float32(step)).astype(np.float32) for s in _specs()]
        c.push_pull(step, grads, values)
    return values


def test_an_exported_checkpoint_opens_with_safetensors_and_equals_the_pulled_values(cluster, server_bin, tmp_path):
    ckpt = tmp_path / "ckpt"
    cl = cluster(shards=2, mode="sync", num_workers=1, args=["--num-shards", "2", "--checkpoint-dir", str(ckpt)])
    with parasync.PsClient(cl.addresses, split_bytes=4096) as c:
        c.register(_specs())
        values = _train(c, 3)
        files = c.checkpoint(3)
        assert [f["shard"] for f in files] == [0, 1] and all(f["step"] == 3 and f["bytes"] > 0 for f in files)
        assert all(i["checkpoints"] and i["restored_step"] is None for i in c.shard_info())

    out = tmp_path / "model.safetensors"
    r = subprocess.run([server_bin, "checkpoint", "export", str(ckpt), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == ["bias", "emb", "head"]
        assert f.metadata()["step"] == "3"
        for name, want in values.items():
            t = f.get_tensor(name)
            assert t.dtype == (torch.bfloat16 if name == "head" else torch.float32)
            got = t.float().numpy()
            assert got.shape == want.shape and got.tobytes() == want.tobytes(), name

    # Each shard's own file is a safetensors file too, with the optimizer slots beside the
    # values; the manifest says which rows of "emb" each part holds.
    manifest = json.loads((ckpt / "step-3" / "manifest.json").read_text())
    emb = next(v for v in manifest["variables"] if v["name"] == "emb")
    assert emb["shape"] == [64, 33] and len(emb["parts"]) == 2
    rows = []
    for part in emb["parts"]:
        with safe_open(str(ckpt / "step-3" / f"shard-{part['shard']}-of-2.safetensors"), framework="pt") as f:
            t = f.get_tensor(part["name"])
            assert f.get_tensor(part["name"] + ":exp_avg").shape == t.shape
            assert t.shape[0] == part["rows"][1] - part["rows"][0]
            rows.append(t.numpy())
    assert np.concatenate(rows).tobytes() == values["emb"].tobytes()

    r = subprocess.run([server_bin, "checkpoint", "inspect", str(ckpt / "step-3")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "step 3, sync mode, 2 shard(s), checksums match" in r.stdout
    assert "emb  [64, 33] f32  adam lr 0.01 (slots exp_avg, exp_avg_sq)" in r.stdout, r.stdout


def test_checkpoint_on_a_shard_without_a_folder_says_what_is_missing(cluster):
    cl = cluster(shards=1, mode="sync")
    with parasync.PsClient(cl.addresses) as c:
        c.register(_specs())
        with pytest.raises(parasync.ParasyncError, match="--checkpoint-dir"):
            c.checkpoint(0)
        assert c.pull(0)["bias"].tolist() == [0.5] * 10, "the shard keeps serving"


def test_a_push_rides_out_a_shard_killed_and_restored_and_its_summary_says_so(cluster, tmp_path):
    ckpt = tmp_path / "ckpt"
    cl = cluster(shards=2, mode="sync", num_workers=1,
                 args=["--num-shards", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every-steps", "1"])
    with parasync.PsClient(cl.addresses, split_bytes=4096, recovery_timeout=30.0) as c:
        c.register(_specs())
        values = _train(c, 3)
        s = c.push_pull(3, [np.ones_like(values[sp.name]) for sp in _specs()], values)
        # emb is split over both shards (split_bytes), head and bias are whole.
        assert len(s.parts) == 4 and s.retried == 0 and s.duplicate == 0
        assert sorted({p[2] for p in s.parts}) == [0, 1] and all(p[3] and p[4] == 1 for p in s.parts)

        # Step 4's checkpoint is complete once shard 1 has written its part (in the background).
        deadline = time.monotonic() + 30
        while not (ckpt / "step-4" / "shard-1-of-2.json").is_file():
            assert time.monotonic() < deadline, "step 4's checkpoint was never written"
            time.sleep(0.01)
        cl.kill(1)
        restarter = threading.Timer(0.3, cl.restart, args=(1, ["--restore", "latest"]))
        restarter.start()
        try:
            s = c.push_pull(4, [np.ones_like(values[sp.name]) for sp in _specs()], values)
        finally:
            restarter.join()
        assert s.accepted == 4 and s.retried >= 1, s
        again = [p for p in s.parts if p[4] > 1]
        assert again and all(p[2] == 1 for p in again), s.parts
        assert c.shard_info()[1]["restored_step"] == 4
        assert all(np.isfinite(v).all() for v in values.values())
