"""One worker of the sync test: pulls, computes a gradient from the pulled values, pushes."""

import json
import sys

import numpy as np

import parasync

cfg = json.loads(sys.argv[1])
w = cfg["worker"]
with parasync.PsClient(cfg["addresses"], worker_id=w, split_bytes=cfg["split_bytes"], pull_timeout=60) as ps:
    init = np.load(cfg["init"])
    ps.register([parasync.VariableSpec(name, init[name].shape, parasync.SGD(cfg["lr"]), init=init[name]) for name in cfg["names"]])
    params = ps.pull(0)
    for step in range(cfg["steps"]):
        grads = {n: np.sin(params[n] * np.float32(w + 1) + np.float32(step)).astype(np.float32) for n in cfg["names"]}
        ps.push(step, grads)
        params = ps.pull(step + 1)
    np.savez(cfg["out"], **params)
print(json.dumps({"worker": w, "ok": True}))
