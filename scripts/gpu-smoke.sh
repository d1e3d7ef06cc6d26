#!/usr/bin/env bash
# NCCL backend smoke test on a GPU machine, one command, under 5 minutes:
#   scripts/gpu-smoke.sh [nccl-smoke options, e.g. --sizes 1MiB,64MiB]
# Runs one rank per visible GPU: allreduce / broadcast / allgather / reduce_scatter
# correctness for f32 and bf16, then an nccl-tests-style busbw table for 1 MiB - 1 GiB.
#
# The binary: built here with cargo if cargo exists, otherwise taken prebuilt from
# $NCCL_SMOKE_BIN (default: target/release/nccl-smoke under the repository root), e.g. built on
# an x86-64 machine with:  cargo build --release -p parasync-collective --features nccl --bin nccl-smoke
#
# NCCL: cudarc looks for libnccl.so, while the nvidia-nccl-cu13 wheel (next to PyTorch) ships
# libnccl.so.2 only; this script finds it ($NCCL_LIB_DIR, the wheel of any python3 around, or
# ldconfig) and points the loader at a libnccl.so symlink in a temporary directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
started=$(date +%s)

log() { echo "[gpu-smoke] $*" >&2; }

# 1. The binary.
bin="${NCCL_SMOKE_BIN:-$root/target/release/nccl-smoke}"
if command -v cargo >/dev/null 2>&1 && [ -z "${NCCL_SMOKE_BIN:-}" ]; then
  log "building nccl-smoke with cargo"
  (cd "$root" && cargo build --release -p parasync-collective --features nccl --bin nccl-smoke)
fi
if [ ! -x "$bin" ]; then
  log "no nccl-smoke binary at $bin and no cargo here; build it elsewhere and set NCCL_SMOKE_BIN"
  exit 2
fi

# 2. libnccl.so.2.
find_nccl_dir() {
  if [ -n "${NCCL_LIB_DIR:-}" ] && ls "$NCCL_LIB_DIR"/libnccl.so* >/dev/null 2>&1; then
    echo "$NCCL_LIB_DIR"; return 0
  fi
  local py
  for py in ${PYTHON:-} python3 python /usr/bin/python3 /usr/local/bin/python3 /opt/conda/bin/python3 "$HOME"/.venv/bin/python3 /opt/venv/bin/python3; do
    command -v "$py" >/dev/null 2>&1 || [ -x "$py" ] || continue
    local d
    d="$("$py" - <<'PY' 2>/dev/null || true
import glob, importlib.util, os, sys
cands = []
try:
    spec = importlib.util.find_spec("nvidia.nccl")
    if spec is not None:
        cands += [os.path.join(p, "lib") for p in (spec.submodule_search_locations or [])]
except Exception:
    pass
for p in sys.path:
    cands.append(os.path.join(p, "nvidia", "nccl", "lib"))
for c in cands:
    if glob.glob(os.path.join(c, "libnccl.so*")):
        print(c)
        break
PY
)"
    if [ -n "$d" ]; then echo "$d"; return 0; fi
  done
  local l
  l="$(ldconfig -p 2>/dev/null | awk '/libnccl\.so/ {print $NF; exit}')"
  if [ -n "$l" ]; then dirname "$l"; return 0; fi
  l="$(timeout 30 find / -xdev -name 'libnccl.so*' -path '*nccl*' 2>/dev/null | head -1 || true)"
  if [ -n "$l" ]; then dirname "$l"; return 0; fi
  return 1
}

nccl_dir="$(find_nccl_dir)" || { log "libnccl.so.2 not found: pip install nvidia-nccl-cu13, or set NCCL_LIB_DIR"; exit 2; }
nccl_dir="$(cd "$nccl_dir" && pwd)"  # absolute: the symlink below lives in another directory
nccl_so="$(ls "$nccl_dir"/libnccl.so.2 2>/dev/null || ls "$nccl_dir"/libnccl.so* | head -1)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
ln -s "$nccl_so" "$tmp/libnccl.so"
export LD_LIBRARY_PATH="$tmp:$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "NCCL: $nccl_so"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >&2 || true

# 3. Run, bounded: whatever time is left of the 5 minutes.
left=$(( 290 - ($(date +%s) - started) ))
[ "$left" -gt 30 ] || left=30
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
log "running $bin $* (limit ${left}s)"
set +e
timeout -k 5 "$left" "$bin" "$@"
rc=$?
set -e
[ "$rc" -eq 124 ] && log "timed out after ${left}s"
log "exit status $rc"
exit "$rc"
