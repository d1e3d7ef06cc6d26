#!/usr/bin/env bash
# Allreduce measurements beside PyTorch's Gloo in one session; raw output goes to
# bench-results/raw/allreduce-<date>.txt. Needs torch (pip install torch) for the peer.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y-%m-%d-%H%M)
out="bench-results/raw/allreduce-$stamp.txt"
mkdir -p bench-results/raw
exec > >(tee "$out") 2>&1
sizes=4KiB,64KiB,1MiB,16MiB,64MiB,256MiB
echo "# parasync allreduce bench beside gloo, $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release -q
for n in 2 4; do
  echo "## parasync N=$n"
  ./target/release/parasync allreduce-bench --ranks "$n" --dtypes f32,bf16 --sizes "$sizes" --reps "${REPS:-5}"
  ./target/release/parasync allreduce-bench --ranks "$n" --dtypes f32 --sizes 4KiB --spin --reps "${REPS:-5}"
  echo "## parasync N=$n, sockets only (--no-peer-copy: what ranks on different hosts use)"
  ./target/release/parasync allreduce-bench --ranks "$n" --dtypes f32 --sizes 1MiB,16MiB,64MiB,256MiB --no-peer-copy --reps "${REPS:-5}"
  echo "## gloo N=$n"
  python3 ../shared/peers/gloo_allreduce.py --ranks "$n" --sizes "$sizes" --runs "${GLOO_RUNS:-2}" --reps "${REPS:-5}" \
    --out "bench-results/raw/gloo-N$n-$stamp.jsonl" 2>&1 | grep -vi "warning\|numpy\|_conversion_method"
  # Buffers on transparent huge pages, as NumPy allocates arrays of 4 MiB or more, and as
  # PyTorch does with THP_MEM_ALLOC_ENABLE=1: both sides get them, so the ratio stays fair.
  echo "## parasync N=$n, huge pages (--huge-pages)"
  ./target/release/parasync allreduce-bench --ranks "$n" --dtypes f32 --sizes 1MiB,16MiB,64MiB,256MiB --huge-pages --reps "${REPS:-5}"
  echo "## gloo N=$n, huge pages (THP_MEM_ALLOC_ENABLE=1)"
  THP_MEM_ALLOC_ENABLE=1 python3 ../shared/peers/gloo_allreduce.py --ranks "$n" --sizes 1MiB,16MiB,64MiB,256MiB --runs "${GLOO_RUNS:-2}" --reps "${REPS:-5}" \
    --out "bench-results/raw/gloo-N$n-thp-$stamp.jsonl" 2>&1 | grep -vi "warning\|numpy\|_conversion_method"
done
echo "## criterion (benches/allreduce.rs): N=2,4, f32 and bf16, 4 KiB to 64 MiB"
rm -rf target/criterion/allreduce_*  # the medians below then come from this run only
cargo bench -q --bench allreduce -- --noplot 2>&1 | grep -E "^allreduce_|time:|thrpt:" | grep -v "%"
echo "## criterion medians (from target/criterion/*/new/estimates.json)"
python3 - <<'PY'
import glob, json, os
for path in sorted(glob.glob("target/criterion/allreduce_*/*/*/new/estimates.json")):
    group, dtype, size = path.split(os.sep)[2:5]
    n = int(group.split("_N")[1].split("_")[0])
    bench = json.load(open(os.path.join(os.path.dirname(path), "benchmark.json")))
    nbytes = list(bench["throughput"].values())[0]
    median_ns = json.load(open(path))["median"]["point_estimate"]
    algbw = nbytes / median_ns
    print("%-14s %-5s %-7s median %11.1f us  algbw %6.3f GB/s  busbw %6.3f GB/s" % (group, dtype, size, median_ns / 1e3, algbw, algbw * 2 * (n - 1) / n))
PY
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
