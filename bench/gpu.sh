#!/usr/bin/env bash
# The benchmark suite on a GPU host, in one go (about 10 minutes), results in one folder.
#   bench/gpu.sh [OUT_DIR]     (after `make setup assets`; the llama.cpp peer is optional)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
APP_DEVICE=cuda .venv/bin/python -m bench.run_all --skip-int8 \
  --out-md "$OUT/benchmarks.md" --out-json "$OUT/latest.json" 2>&1 | tee "$OUT/run.log"
