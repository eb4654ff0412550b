#!/usr/bin/env bash
# On a machine with 2 GPUs: the tiny config (attention transfer, then LoRA + KL) under FSDP2 and
# under DDP, then FSDP resumed from its step-6 checkpoint. Prints per-step losses side by side and
# the largest difference between the two runs' final merged weights.
#   bash scripts/check_fsdp.sh OUT_DIR
set -euo pipefail
out=${1:?usage: scripts/check_fsdp.sh OUT_DIR}
mkdir -p "$out"
run() {  # accelerate-config output-dir [extra args]
  local cfg=$1 dir=$2; shift 2
  accelerate launch --config_file "configs/accelerate/$cfg.yaml" -m t2r.cli finetune configs/tiny.yaml \
    --set "output_dir=$dir" "$@" > "$dir.log" 2>&1 || { tail -40 "$dir.log"; exit 1; }
}
run fsdp-2gpu "$out/fsdp"
run cpu-2proc "$out/ddp"
cp "$out/fsdp/metrics.jsonl" "$out/fsdp-first.jsonl"
echo step-0000006 > "$out/fsdp/checkpoints/latest"
run fsdp-2gpu "$out/fsdp" --resume
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

out = Path(sys.argv[1])
rows = lambda p: {r["step"]: r["loss"] for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
fsdp, ddp, resumed = rows(out / "fsdp-first.jsonl"), rows(out / "ddp/metrics.jsonl"), rows(out / "fsdp/metrics.jsonl")
print("| step | FSDP | DDP | FSDP resumed from step 6 |\n|---|---|---|---|")
for s in sorted(ddp):
    print(f"| {s} | {fsdp.get(s)} | {ddp[s]} | {resumed.get(s)} |")
print("max |FSDP - DDP| loss:", max(abs(fsdp[s] - ddp[s]) for s in ddp))
print("max |resumed - first| loss after step 6:", max(abs(resumed[s] - fsdp[s]) for s in fsdp if s > 6))
a, b = load_file(out / "fsdp/model/model.safetensors"), load_file(out / "ddp/model/model.safetensors")
assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
print("max |FSDP - DDP| final weight:", max((a[k].float() - b[k].float()).abs().max().item() for k in a))
print("architectures:", json.loads((out / "fsdp/model/config.json").read_text())["architectures"])
PY
