#!/usr/bin/env bash
# Generate Python stubs from protos/ into OUT (default: the repo root, so they
# land in the sluice.v1 package). Deterministic, so `make lint` can diff them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
py="${PYTHON:-$root/.venv/bin/python}"
mkdir -p "$out/sluice/v1"
cd "$root/protos"
"$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  --plugin=protoc-gen-mypy="$(dirname "$py")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" \
  sluice/v1/*.proto
touch "$out/sluice/v1/__init__.py"
