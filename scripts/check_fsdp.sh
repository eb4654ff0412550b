#!/usr/bin/env bash
# The tiny config (attention transfer, then LoRA + KL) under FSDP2 and under DDP, then FSDP resumed
# from its step-6 checkpoint. Prints per-step losses side by side and the largest difference between
# the two runs' final merged weights; writes them to OUT_DIR/summary.json too.
#   bash scripts/check_fsdp.sh OUT_DIR          # on a machine with 2 GPUs
#   bash scripts/check_fsdp.sh OUT_DIR --cpu    # 2 CPU processes over gloo (scripts/fsdp_on_cpu.py): t2r's
#                                               # FSDP logic without GPUs; not bf16, NCCL or GPU memory
#   ... --set KEY=VALUE                         # a config key for every run, e.g. --set loss.fused=off
# PYTHON picks the interpreter (default python3).
set -euo pipefail
out=${1:?usage: scripts/check_fsdp.sh OUT_DIR [--cpu] [--set KEY=VALUE ...]}
shift
py=${PYTHON:-python3}
fsdp_entry=(-m t2r.cli)
sets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) fsdp_entry=(scripts/fsdp_on_cpu.py); shift ;;
    --set) [[ $# -ge 2 ]] || { echo "check_fsdp.sh: --set needs KEY=VALUE" >&2; exit 2; }
           sets+=(--set "$2"); shift 2 ;;
    *) echo "check_fsdp.sh: unknown option '$1' (the options are --cpu and --set KEY=VALUE)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
run() {  # accelerate-config output-dir entry... -- [extra args]
  local cfg=$1 dir=$2; shift 2
  local entry=() ; while [[ "$1" != "--" ]]; do entry+=("$1"); shift; done; shift
  "$py" -m accelerate.commands.launch --config_file "configs/accelerate/$cfg.yaml" "${entry[@]}" finetune \
    configs/tiny.yaml --set "output_dir=$dir" ${sets[@]+"${sets[@]}"} "$@" > "$dir.log" 2>&1 || { tail -40 "$dir.log"; exit 1; }
}
run fsdp-2gpu "$out/fsdp" "${fsdp_entry[@]}" --
grep -q "under FSDP" "$out/fsdp.log" || { echo "check_fsdp.sh: the FSDP run did not shard (see $out/fsdp.log)" >&2; exit 1; }
run cpu-2proc "$out/ddp" -m t2r.cli --
cp "$out/fsdp/metrics.jsonl" "$out/fsdp-first.jsonl"
echo step-0000006 > "$out/fsdp/checkpoints/latest"
run fsdp-2gpu "$out/fsdp" "${fsdp_entry[@]}" -- --resume
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path

from safetensors.torch import load_file

out = Path(sys.argv[1])
rows = lambda p: {r["step"]: r["loss"] for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
fsdp, ddp, resumed = rows(out / "fsdp-first.jsonl"), rows(out / "ddp/metrics.jsonl"), rows(out / "fsdp/metrics.jsonl")
print("| step | FSDP | DDP | FSDP resumed from step 6 |\n|---|---|---|---|")
for s in sorted(ddp):
    print(f"| {s} | {fsdp.get(s)} | {ddp[s]} | {resumed.get(s)} |")
a, b = load_file(out / "fsdp/model/model.safetensors"), load_file(out / "ddp/model/model.safetensors")
assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
summary = {
    "steps": {"fsdp": len(fsdp), "ddp": len(ddp), "resumed": len(resumed)},
    "max_rel_loss_fsdp_ddp": max(abs(fsdp[s] - ddp[s]) / abs(ddp[s]) for s in ddp),
    "max_rel_loss_resumed_first": max(abs(resumed[s] - fsdp[s]) / abs(fsdp[s]) for s in fsdp if s > 6),
    "max_weight_fsdp_ddp": max((a[k].float() - b[k].float()).abs().max().item() for k in a),
    "architectures": json.loads((out / "fsdp/model/config.json").read_text())["architectures"],
}
for key, value in summary.items():
    print(f"{key}: {value}")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
PY
