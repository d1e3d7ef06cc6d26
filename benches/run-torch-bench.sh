#!/usr/bin/env bash
# PyTorch on Parasync beside PyTorch's Gloo and the parameter-server demo, in one session;
# raw output goes to bench-results/raw/torch-<date>.txt, the summary tables at its end.
#
#   1. benches/torch_bench.py under `python -m parasync.launch -n N`, N = 2 and 4: DDP step
#      time of a ResNet-50-shaped model over Gloo, with Parasync's comm hook, over the
#      "parasync" backend; DistributedOptimizer and Horovod's per-parameter recipe over Gloo;
#      the exchange alone (DDP-sized buckets allreduced, no training) over each, and no
#      exchange at all (the floor).
#   2. $PS_RUNS (default 3) runs each, sync and async, alternating: examples/torch_ps_digits.py,
#      examples/numpy_ps.py and `parasync demo` (2 shards, 4 workers): steps/s per worker.
# Needs: $PYTHON (default python3) with torch and the parasync package; cargo.
#   With BUCKET_VIEW=1, the DDP variants once more with gradient_as_bucket_view=True.
# Knobs: ROUNDS, STEPS, PS_RUNS, BUCKET_VIEW, PYTHON, CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
export CARGO_TARGET_DIR=$target
py=${PYTHON:-python3}
rounds=${ROUNDS:-3}
steps=${STEPS:-8}
ps_runs=${PS_RUNS:-3}
bin="$target/release/parasync"
out="bench-results/raw/torch-$(date -u +%Y-%m-%d-%H%M).txt"
mkdir -p bench-results/raw
exec > >(tee "$out") 2>&1

echo "# parasync.torch vs Gloo, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench-results' || echo ' (+ uncommitted changes)')"
echo "# nproc: $(nproc)"
lscpu | head -n 20 | sed 's/^/# lscpu: /'
echo "# python: $($py -c 'import sys, torch, parasync; print(sys.version.split()[0], "torch", torch.__version__, "parasync", parasync.__version__)')"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release -q --bin parasync
export PARASYNC_BIN="$PWD/$bin"

for n in 2 4; do
  echo "## torch_bench N=$n, load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$py" -m parasync.launch -n "$n" --grace 600 benches/torch_bench.py --rounds "$rounds" --steps "$steps" | sed 's/^\[0\] //'
  if [ -n "${BUCKET_VIEW:-}" ]; then
    echo "## torch_bench N=$n, DDP variants with gradient_as_bucket_view=True, load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$py" -m parasync.launch -n "$n" --grace 600 benches/torch_bench.py --rounds "$rounds" --steps "$steps" \
      --variants local,ddp-gloo,ddp-hook,ddp-backend --bucket-view | sed 's/^\[0\] //'
  fi
done

ps_json() {  # bench-name command...: runs it, re-emits its JSON line tagged
  local name=$1; shift
  "$@" | "$py" -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    if line.startswith("{"):
        r = json.loads(line)
        r = {"bench": name, "mode": r["mode"], "steps_per_s": r.get("steps_per_s", r.get("steps_per_second")),
             "accuracy": r.get("accuracy", r.get("test_accuracy")), "workers": r["workers"], "shards": r["shards"]}
        print("%-9s %-5s %6.0f steps/s per worker, accuracy %.4f" % (name, r["mode"], r["steps_per_s"], r["accuracy"]))
        print("#json " + json.dumps(r, sort_keys=True), flush=True)' "$name"
}
for r in $(seq 1 "$ps_runs"); do
  echo "## ps run $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
  for mode in sync async; do
    ps_json torch-ps "$py" examples/torch_ps_digits.py --mode "$mode" --json
    ps_json numpy-ps "$py" examples/numpy_ps.py --mode "$mode" --json
    ps_json demo "$bin" demo --mode "$mode" --json
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "## summary (benches/torch_bench.py summary)"
"$py" benches/torch_bench.py summary "$out"
echo "# raw output: $out"
