#!/usr/bin/env bash
# GPU benchmark for a lent H100/H200 (or any CUDA box), under 8 minutes, no downloads:
# the real SD2.1 architecture with random weights, fp16 at 768. Writes JSON to $1 (or
# $OUT/gpu.json). Needs the project importable (PYTHONPATH=repo root or pip install -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}/gpu.json}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python3 -m bench.gpu --json "$out" --budget-s 400 "${@:2}"
