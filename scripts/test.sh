#!/usr/bin/env bash
# The whole test suite: every Rust crate (unit tables, services, end-to-end tests with real
# server processes, the C ABI's programs compiled with cc), then the Python package built
# from source and its pytest suite against real `parasync server` processes.
#
# The Python environment lives in $PARASYNC_VENV (default: .venv in the repository); it is
# created on first use (PyTorch from PyPI is several GB). Needs: cargo, a C compiler, python3
# (>= 3.10) with venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${PARASYNC_VENV:-$PWD/.venv}"

echo "== cargo test --workspace --all-features"
cargo test --workspace --all-features

echo "== Python environment: $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r python/requirements-test.txt -r python/requirements-torch.txt

echo "== pip install ./python (builds the native module from source)"
"$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps ./python

echo "== pytest python/tests"
export PARASYNC_BIN="${PARASYNC_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/parasync}"
"$VENV/bin/python" -m pytest python/tests -q --timeout=600 -p no:cacheprovider
