#!/usr/bin/env bash
# The Python binding beside the Rust API, interleaved in one session; raw output goes to
# bench-results/raw/python-<date>.txt, with the medians and ratios at its end.
#
# Rounds alternate which side goes first (even counts, so each side leads equally often):
#   - $PS_ROUNDS (default 6) PS rounds: benches/python_bench.py ps, and the criterion bench
#     benches/ps_throughput.rs filtered to its 64 MiB f32-wire push/pull and 100 B ops (same
#     server flags, same client defaults: data plane on, no reply spin);
#   - $ROUNDS (default 4) allreduce rounds, f32: N=1 at 4 and 64 KiB (no peers: the cost of
#     the call itself), then N=2 and N=4 at 4 KiB..64 MiB: `parasync allreduce-bench` plain
#     and with --huge-pages, and benches/python_bench.py allreduce under
#     `python -m parasync.launch` with numpy's default allocation (MADV_HUGEPAGE at 4 MiB and
#     up) and with it off; then one more pair at 4 KiB..1 MiB ("small": no huge pages either side).
#   - with $GLOO_PYTHON (a Python with torch), PyTorch's Gloo in every allreduce round, N=2
#     and N=4 at the same sizes (../shared/peers/gloo_allreduce.py, one fresh run a round).
# Needs: the `parasync` Python package importable by $PYTHON (default python3), cargo.
# With PIN=1 every allreduce run pins rank r to CPU r mod the CPU count (both sides alike).
# Knobs: ROUNDS, PS_ROUNDS, REPS (allreduce repetitions), PIN, SIZES, SMALL_SIZES, PYTHON, CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
export CARGO_TARGET_DIR=$target
py=${PYTHON:-python3}
rounds=${ROUNDS:-4}
ps_rounds=${PS_ROUNDS:-6}
reps=${REPS:-5}
sizes=${SIZES:-4KiB,64KiB,1MiB,16MiB,64MiB}
small_sizes=${SMALL_SIZES:-4KiB,64KiB,1MiB}
bin="$target/release/parasync"
out="bench-results/raw/python-$(date -u +%Y-%m-%d-%H%M).txt"
mkdir -p bench-results/raw
exec > >(tee "$out") 2>&1

echo "# parasync Python binding vs Rust, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench-results' ':!benches/python_bench.py' ':!benches/run-python-bench.sh' || echo ' (+ uncommitted changes)')"
echo "# nproc: $(nproc)"
lscpu | head -n 20 | sed 's/^/# lscpu: /'
echo "# python: $($py -c 'import sys, numpy, parasync; print(sys.version.split()[0], "numpy", numpy.__version__, "parasync", parasync.__version__, parasync._native.__file__)')"
echo "# pinned ranks (PIN): ${PIN:-0}"
echo "# THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo n/a)"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release -q --bin parasync
# The bench executable is run directly below, so that a commit landing mid-run does not
# rebuild it between rounds.
bench_exe=$(cargo bench -q --no-run --bench ps_throughput --message-format=json | "$py" -c '
import json, sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "ps_throughput":
        print(m["executable"])' | tail -n 1)
echo "# rust: $(rustc --version), bench $bench_exe"
native=$("$py" -c 'import parasync._native as n; print(n.__file__)')
native_sum() { sha256sum "$native" | cut -c1-16; }
native_start=$(native_sum)
echo "# python native module: $native, sha256 $native_start, modified $(date -u -r "$native" +%FT%TZ)"

py_ps() {
  echo "## [r$1] python ps"
  PARASYNC_BIN="$bin" "$py" benches/python_bench.py ps --binary "$bin"
}
rust_ps() {
  echo "## [r$1] rust ps (criterion, benches/ps_throughput.rs)"
  rm -rf "$target"/criterion/ps_*
  "$bench_exe" --bench --noplot --warm-up-time 1 --measurement-time 3 \
    'ps_64MiB.*/p(ush|ull)_f32_wire|ps_small' 2>&1 | grep -E "^ps_|time:|thrpt:" | grep -v "%" || true
  "$py" - "$target" <<'PY'
import glob, json, os, sys
names = {"push_f32_wire": "push_64MiB_f32", "pull_f32_wire": "pull_64MiB_f32"}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "criterion/ps_*/*/new/estimates.json"))):
    group, bench = path.split(os.sep)[-4:-2]
    med = json.load(open(path))["median"]["point_estimate"] / 1e9
    rec = {"bench": "rust-ps", "group": group, "name": names.get(bench, bench), "median_s": med}
    line = "rust ps %-28s median %10.1f us" % (rec["name"], med * 1e6)
    if group.startswith("ps_64MiB"):
        rec["GBps"] = (64 << 20) / med / 1e9
        line += "  %.2f GB/s" % rec["GBps"]
    print(line)
    print("#json " + json.dumps(rec, sort_keys=True))
PY
}
rust_ar() {  # round N variant [sizes]
  local flags=()
  [ "$3" = huge ] && flags=(--huge-pages)
  [ "${PIN:-0}" = 1 ] && flags+=(--pin-cores)
  echo "## [r$1] rust allreduce N=$2 $3"
  "$bin" allreduce-bench --ranks "$2" --dtypes f32 --sizes "${4:-$sizes}" --reps "$reps" "${flags[@]}"
}
py_ar() {  # round N variant [sizes]
  local flags=()
  [ "$3" = plain ] && flags=(--no-hugepage)
  [ "${PIN:-0}" = 1 ] && flags+=(--pin-cores)
  echo "## [r$1] python allreduce N=$2 $3"
  PARASYNC_BIN="$bin" "$py" -m parasync.launch -n "$2" benches/python_bench.py allreduce --sizes "${4:-$sizes}" --reps "$reps" "${flags[@]}"
}

gloo_ar() {  # round N
  echo "## [r$1] gloo allreduce N=$2"
  if [ -z "${GLOO_PYTHON:-}" ]; then echo "# GLOO_PYTHON unset: not measured"; return; fi
  "$GLOO_PYTHON" ../shared/peers/gloo_allreduce.py --ranks "$2" --sizes "$sizes" --reps "$reps" --runs 1 \
    --out "$(mktemp)" 2>&1 | grep -E "^allreduce|^torch"
}

# PS rounds first (their per-round noise is larger, so they get more rounds), then allreduce.
for r in $(seq 1 "$ps_rounds"); do
  echo "# ps round $r, load $(cut -d' ' -f1-3 /proc/loadavg), python native sha256 $(native_sum)"
  if [ $((r % 2)) = 1 ]; then py_ps "$r"; rust_ps "$r"; else rust_ps "$r"; py_ps "$r"; fi
done
for r in $(seq 1 "$rounds"); do
  echo "# allreduce round $r, load $(cut -d' ' -f1-3 /proc/loadavg), python native sha256 $(native_sum)"
  # N=1: no peers, so the time per call is the call's own cost (binding overhead on the Python side)
  if [ $((r % 2)) = 1 ]; then rust_ar "$r" 1 plain 4KiB,64KiB; py_ar "$r" 1 plain 4KiB,64KiB
  else py_ar "$r" 1 plain 4KiB,64KiB; rust_ar "$r" 1 plain 4KiB,64KiB; fi
  for n in 2 4; do
    if [ $((r % 2)) = 1 ]; then
      rust_ar "$r" "$n" plain; py_ar "$r" "$n" huge; rust_ar "$r" "$n" huge; py_ar "$r" "$n" plain
    else
      py_ar "$r" "$n" plain; rust_ar "$r" "$n" huge; py_ar "$r" "$n" huge; rust_ar "$r" "$n" plain
    fi
    gloo_ar "$r" "$n"
    # one more pair at the small sizes, whose pairs spread the most
    if [ $((r % 2)) = 1 ]; then py_ar "$r" "$n" small "$small_sizes"; rust_ar "$r" "$n" small "$small_sizes"
    else rust_ar "$r" "$n" small "$small_sizes"; py_ar "$r" "$n" small "$small_sizes"; fi
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$(native_sum)" != "$native_start" ]; then
  echo "# WARNING: $native changed during the run (sha256 $(native_sum)): the rounds measured different builds"
fi

echo "## summary (benches/python_bench.py summary)"
"$py" benches/python_bench.py summary "$out"
echo "# raw output: $out"
