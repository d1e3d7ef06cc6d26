#!/usr/bin/env bash
# Allreduce measurements beside PyTorch's Gloo in one session; raw output goes to
# bench-results/raw/allreduce-<date>.txt. Needs torch (pip install torch) for the peer.
set -euo pipefail
cd "$(dirname "$0")/.."
out="bench-results/raw/allreduce-$(date -u +%Y-%m-%d).txt"
mkdir -p bench-results/raw
exec > >(tee "$out") 2>&1
sizes=4KiB,64KiB,1MiB,16MiB,64MiB,256MiB
echo "# parasync allreduce bench beside gloo, $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release -q
for n in 2 4; do
  echo "## parasync N=$n"
  ./target/release/parasync allreduce-bench --ranks "$n" --dtypes f32,bf16 --sizes "$sizes" --reps "${REPS:-5}"
  ./target/release/parasync allreduce-bench --ranks "$n" --dtypes f32 --sizes 4KiB --spin --reps "${REPS:-5}"
  echo "## gloo N=$n"
  python3 ../shared/peers/gloo_allreduce.py --ranks "$n" --sizes "$sizes" --runs "${GLOO_RUNS:-2}" --reps "${REPS:-5}" \
    --out "bench-results/raw/gloo-N$n.jsonl" 2>&1 | grep -vi "warning\|numpy\|_conversion_method"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
