#!/usr/bin/env bash
# The allreduce benchmark matrix of bench-results/allreduce.md: N = 2 and 4, f32 and bf16, 4 KiB - 256 MiB,
# plus the 4 KiB latency with busy-polling. Output: the nccl-tests-style tables on stdout.
#   collective/scripts/bench-allreduce.sh [extra allreduce-bench flags]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
cargo build --release -p parasync-collective --bin collective-rank >&2
bin=target/release/collective-rank
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) load: $(cut -d' ' -f1-3 /proc/loadavg)"
for n in 2 4; do
  "$bin" allreduce-bench --ranks "$n" --dtypes f32,bf16 --sizes 4KiB,64KiB,1MiB,16MiB,64MiB,256MiB "$@"
  "$bin" allreduce-bench --ranks "$n" --dtypes f32 --sizes 4KiB --spin "$@"
done
