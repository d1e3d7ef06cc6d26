#!/usr/bin/env bash
# The cost of the auth token and of TLS: push and pull of one 64 MiB f32 variable and the
# 100 B push + pull round trip through one shard on 127.0.0.1, with the shard plain, with
# a token, with TLS, and with both; the four settings interleaved over ROUNDS rounds in one
# session (criterion's median of each run, then the median over rounds). Writes the raw
# output to bench-results/raw/security-<date>.txt and ends with the summary table.
# ROUNDS (3), MEASURE_S (criterion seconds per 64 MiB benchmark, 4), FILTER (criterion's
# benchmark filter, 'f32_wire|push_pull_100B').
set -euo pipefail
cd "$(dirname "$0")/.."
out="bench-results/raw/security-$(date -u +%Y-%m-%d-%H%M).txt"
mkdir -p bench-results/raw
exec > >(tee "$out") 2>&1

echo "# parasync security-cost bench, $(date -u +%FT%TZ)"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release --benches -q
for round in $(seq 1 "${ROUNDS:-3}"); do
  for security in plain token tls tls+token; do
    echo "## round $round security $security"
    PARASYNC_BENCH_SECURITY=$security PARASYNC_BENCH_SKIP_SYNC=1 PARASYNC_BENCH_MEASURE_S="${MEASURE_S:-4}" \
      cargo bench -q --bench ps_throughput -- --noplot "${FILTER:-f32_wire|push_pull_100B}" 2>&1 \
      | grep -E "^ps_|time:|thrpt:" | grep -v "%"
  done
done
python3 benches/summarize_security.py "$out"
