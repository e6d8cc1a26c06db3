#!/usr/bin/env bash
# GPU recipe (one script, sized for a 10-minute run on one modern GPU): full fine-tune of the
# embedded base with the seed's hyperparameters (AdamW lr 1e-5, weight decay, cosine with
# warmup, 3 epochs, batch 16 per device, bf16) on the whole training part (7,999 rows), MC
# objective, then the full held-out evaluation against the base model (docs/results.md).
#
#   scripts/gpu_finetune.sh [OUT_DIR]          (run from the repo root after `make setup assets`)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu-full}"
PY=.venv/bin/python
NAME=smollm2-135m-hellaswag-full
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt" || true
start=$(date +%s)
$PY -m app.training.train --dataset hellaswag --model smollm2-135m-instruct --output_dir "$OUT" \
  --lr 1e-5 --epochs 3 --batch-size 16 --objective mc --eval-examples 500 \
  --eval-at 0,1000,4000,8000,16000 --save-every 500 --export-name "$NAME" 2>&1 | tee "$OUT/train.log"
mid=$(date +%s)
APP_DEVICE=cuda $PY -m app.evaluate --model smollm2-135m-instruct --out "$OUT/base_heldout.json" --quiet
APP_DEVICE=cuda $PY -m app.evaluate --model "$NAME" --out "$OUT/finetuned_heldout.json" --quiet
$PY -m app.evaluate --compare-reports "$OUT/base_heldout.json" "$OUT/finetuned_heldout.json" \
  --training-run "$OUT" --results-md "$OUT/results.md"
end=$(date +%s)
echo "train $((mid - start)) s, evaluate $((end - mid)) s" | tee "$OUT/timing.txt"
