#!/usr/bin/env bash
# Runs every parameter-server measurement in one session, beside its peers, and writes the
# raw output to bench-results/raw/ps-<date>.txt:
#   loopback TCP limit (iperf3), Python grpcio baseline, criterion push/pull/small-op bench,
#   peak-memory bench, and the demo's sync step rate.
# Needs: iperf3 (apt-get install iperf3), grpcio + protobuf (pip install grpcio protobuf),
# ../shared/peers/grpc_bench.py beside the project.
set -euo pipefail
cd "$(dirname "$0")/.."
out="bench-results/raw/ps-$(date -u +%Y-%m-%d-%H%M).txt"
mkdir -p bench-results/raw
exec > >(tee "$out") 2>&1

echo "# parasync ps bench, $(date -u +%FT%TZ)"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release --benches -q

echo "## loopback TCP (iperf3, one stream, 5 s each)"
for len in 128K 1M; do
  iperf3 -s -1 -D -p 5299 >/dev/null; sleep 0.5
  iperf3 -c 127.0.0.1 -p 5299 -t 5 -l "$len" -f g | grep -E "receiver" | sed "s/^/len=$len /"
done

echo "## python grpcio baseline"
python3 ../shared/peers/grpc_bench.py --reps 5 --out bench-results/raw/grpc-peer.jsonl | grep -E "^grpc"

echo "## criterion: parasync push/pull 64 MiB and 100 B round trip"
# Each config is chunk:grpc_conns:server_threads:client_threads:data_conns (data_conns 0 =
# tensors over gRPC; otherwise over the data plane with that many requests per shard).
rm -rf target/criterion/ps_*  # the medians below then come from this run only
for cfg in ${PS_BENCH_CONFIGS:-1048576:1:2:0:8 1048576:1:2:0:0}; do
  IFS=: read -r chunk conns srv cli data <<<"$cfg"
  PARASYNC_BENCH_CHUNK=$chunk PARASYNC_BENCH_CONNS=$conns PARASYNC_BENCH_SERVER_THREADS=$srv \
  PARASYNC_BENCH_CLIENT_THREADS=$cli PARASYNC_BENCH_DATA_CONNS=${data:-8} \
    cargo bench -q --bench ps_throughput -- --noplot 2>&1 | grep -E "^ps_|time:|thrpt:" | grep -v "%"
done
# the small ops again with the client polling 100 µs for replies (ClientOptions::reply_spin)
PARASYNC_BENCH_SPIN_US=100 cargo bench -q --bench ps_throughput -- --noplot 'ps_small|ps_sync' 2>&1 \
  | grep -E "^ps_|time:|thrpt:" | grep -v "%"
echo "## criterion medians (from target/criterion/*/new/estimates.json)"
python3 - <<'PY'
import glob, json, os
for path in sorted(glob.glob("target/criterion/ps_*/*/new/estimates.json")):
    group, bench = path.split(os.sep)[2:4]
    median_ns = json.load(open(path))["median"]["point_estimate"]
    rate = ""
    if group.startswith("ps_64MiB"):
        rate = "  %.2f GB/s" % ((64 << 20) / median_ns)
    print("%-55s %-28s median %10.1f us%s" % (group, bench, median_ns / 1e3, rate))
PY

echo "## bf16 / f32 wire ratio, paired (benches/ps_wire_ratio.rs: each round times both wires back to back)"
cargo bench -q --bench ps_wire_ratio 2>&1 | grep -vE "^(warning|Running)"

echo "## peak memory"
cargo bench -q --bench ps_memory 2>&1 | grep -vE "^(warning|Running)"

echo "## demo sync step rate (release, 2 shards, 4 workers; 3 runs)"
for i in 1 2 3; do
  ./target/release/parasync demo --json | python3 -c '
import json, sys
r = json.load(sys.stdin)
rate = r["steps_per_second"]
print("run %s: steps/s per worker %.1f, step time %.2f ms, accuracy %.4f" % (sys.argv[1], rate, 1000 / rate, r["test_accuracy"]))' "$i"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
