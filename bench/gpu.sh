#!/usr/bin/env bash
# GPU benchmark for a lent H100/H200 (or any CUDA box), under 8 minutes, no downloads:
# the real SD2.1 architecture with random weights, fp16 at 768. Writes JSON to $1 (or
# $OUT/gpu.json). Installs this checkout (editable, no dependencies) when the package
# is not importable yet.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}/gpu.json}"
export PYTHONUNBUFFERED=1
python3 -c "import cleandift.bench.gpu" 2>/dev/null \
  || python3 -m pip install -q --no-deps --no-build-isolation -e .
exec timeout 480 python3 -m cleandift.bench.gpu --json "$out" --budget-s 400 "${@:2}"
