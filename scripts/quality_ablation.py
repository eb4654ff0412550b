"""Which conversion and training ingredients keep the teacher's quality: an ablation at equal tokens.

Each row is a ``t2r finetune`` run of SmolLM2-135M-Instruct (or --model) on the data of
configs/smollm2-135m-gsa.yaml (70% this Python's standard library, 30% English prose) with one
ingredient changed from the reference recipe ``B``; every run sees the same number of training
tokens. Each result is then scored by ``t2r eval`` on two held-out corpora (the stdlib modules held
out of training, and the prose book held out of training) beside the teacher on the same tokens; window hybrids also with their GSA branch and their window switched off. Runs go to the
GPUs in parallel (``--per-gpu`` at a time on each). Prints a markdown table; everything is kept
under --out (``ROW/run_summary.json``, ``ROW/eval.json``, ``results.json``, ``table.md``).

    python scripts/quality_ablation.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --out OUT \\
        --tokens 5e6 --rows B@20e6,B,identity,window64 --gpus 0,1 --per-gpu 3

A row written ``NAME@TOKENS`` trains on TOKENS instead of --tokens (its folder: NAME-20M ...).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from t2r.train.run_folder import RunFolder  # noqa: E402
CONFIG = ROOT / "configs" / "smollm2-135m-gsa.yaml"

# The reference recipe B: a layer close to the teacher (RoPE kept, a learnable per-head linear map on
# q and k that starts as the identity, identity v, no output norm, f_proj initialised from the keys),
# attention transfer of the new parameters, then a full finetune with next-token loss + KL.
B_CONVERSION = dict(num_slots=64, gate_logit_normalizer=8, feature_map="linear", use_rope=True,
                    v_activation="identity", output_norm=False, gate_source="f_proj", f_proj_init="key",
                    window_size=0, softmax_layers="none")
PAPER_CONVERSION = dict(num_slots=64, gate_logit_normalizer=8, feature_map="swish", use_rope=False,
                        v_activation="silu", output_norm=True, gate_source="f_proj", f_proj_init="random",
                        window_size=0, softmax_layers="none")
TRANSFER = dict(name="attention_transfer", lr=1e-2, warmup_steps=10, schedule="cosine")
FINETUNE = dict(name="finetune", lr=3e-4, warmup_steps=20, schedule="cosine", lora=None, kl_weight=1.0)
LORA = dict(rank=8, alpha=16, dropout=0.0)

STDLIB_ONLY = {"data.mix": [{"dataset": "python-stdlib"}]}

# name -> (what changes from B, conversion overrides, transfer overrides or None to drop it, finetune overrides
#          [, other --set overrides])
ROWS = {
    "B": ("reference: linear map, RoPE, id v, no norm, f_proj from keys; transfer; full FT + KL", {}, {}, {}),
    "window64": ("B + 64-token softmax window in each layer (hybrid)", dict(window_size=64), {}, {}),
    "identity": ("feature map identity (transfer trains only the gates)", dict(feature_map="identity"), {}, {}),
    "hedgehog": ("feature map hedgehog (softmax of a learned projection)", dict(feature_map="hedgehog"), {}, {}),
    "softmax": ("feature map softmax over the head dim (Liger, no params)", dict(feature_map="softmax"), {}, {}),
    "key-gate": ("gates pooled from the key projection, no f_proj (Liger)", dict(gate_source="key"), {}, {}),
    "fproj-random": ("f_proj initialised at random", dict(f_proj_init="random"), {}, {}),
    "no-rope": ("RoPE dropped in the GSA layer", dict(use_rope=False), {}, {}),
    "lora": ("LoRA r=8 on q/k/v/o (lr 1e-3) instead of a full finetune", {}, {}, dict(lora=LORA, lr=1e-3)),
    "no-kl": ("next-token loss only (kl_weight 0)", {}, {}, dict(kl_weight=0.0)),
    "no-transfer": ("no attention-transfer stage (all tokens in the finetune)", {}, None, {}),
    "paper": ("the GSA paper's layer (swish, no RoPE, SiLU v, output norm, random f_proj)", "paper", {}, {}),
    "window64-lora": ("window64 with LoRA r=8 (lr 1e-3)", dict(window_size=64), {}, dict(lora=LORA, lr=1e-3)),
    "tau16": ("gate logit normalizer 16", dict(gate_logit_normalizer=16), {}, {}),
    "stdlib-only": ("trained on Python source only (no prose)", {}, {}, {}, STDLIB_ONLY),
    "window64-stdlib-only": ("window64 trained on Python source only", dict(window_size=64), {}, {}, STDLIB_ONLY),
    # the other mixers (t2r/layers/gla.py): only the mixer changed, then also with their per-head output norm
    # (B has none; GLA and SUPRA normalise each head's output, SUPRA in place of linear attention's denominator)
    "gla": ("mixer gla: gated linear attention, a low-rank data-dependent gate per key dim", dict(mixer="gla"), {}, {}),
    "linear": ("mixer linear: linear attention with RetNet's fixed decay per kv head", dict(mixer="linear"), {}, {}),
    "gla-norm": ("gla + its per-head output norm (RMSNorm)", dict(mixer="gla", output_norm=True), {}, {}),
    "linear-norm": ("linear + its per-head output norm (SUPRA)", dict(mixer="linear", output_norm=True), {}, {}),
    # with a positive feature map (hedgehog: softmax of a learned projection, LoLCATs) and, like B, no output
    # norm: on SmolLM2 they start from a transfer error near B's, where gla-norm / linear-norm start 7x higher
    "gla-hedgehog": ("mixer gla with the hedgehog feature map", dict(mixer="gla", feature_map="hedgehog"), {}, {}),
    "linear-hedgehog": ("mixer linear with the hedgehog feature map", dict(mixer="linear", feature_map="hedgehog"),
                        {}, {}),
    # GSA at the gla/linear mixers' state size: 2 x 32 slots x head dim = head dim x head dim per kv head
    "slots32": ("GSA with 32 slots: the same state bytes as gla and linear", dict(num_slots=32), {}, {}),
}


MAX_DOCUMENTS = None  # --max-documents (smoke tests)
STDLIB_ONLY_ALL = False  # --stdlib-only: every row trains on Python only (as the first sweep did)


def parse_row(spec: str, default_tokens: float) -> tuple[str, float, str]:
    """'B@20e6' -> ('B', 20e6, 'B-20M'); 'B' -> ('B', default, 'B')."""
    name, _, tokens = spec.partition("@")
    if name not in ROWS:
        raise SystemExit(f"unknown row {name!r}; choose from {', '.join(ROWS)}")
    if not tokens:
        return name, default_tokens, name
    n = float(tokens)
    return name, n, f"{name}-{n / 1e6:g}M"


def row_overrides(name: str, model: str, tokens: float, seq_len: int, micro: int, transfer_tokens: float,
                  cache: Path) -> list[str]:
    _, conv, transfer, finetune, *extra = ROWS[name]
    conversion = dict(PAPER_CONVERSION if conv == "paper" else {**B_CONVERSION, **conv})
    per_step = seq_len * micro
    total = max(2, round(tokens / per_step))
    stages = []
    if transfer is not None:
        t_steps = max(1, round(transfer_tokens / per_step))
        stages.append({**TRANSFER, **transfer, "steps": t_steps})
        total -= t_steps
    stages.append({**FINETUNE, **finetune, "steps": total})
    sets = {"model.source": model, "model.conversion": conversion, "stages": stages, "data.seq_len": seq_len,
            "batch.micro_batch_size": micro, "batch.grad_accum": 1, "eval.max_batches": 2, "eval.before": False, "eval.teacher": False,
            "eval.every_steps": 100000, "checkpoint.every_steps": 100000, "logging.progress_bar": False,
            "logging.tensorboard": False, "data.num_proc": 4, "data.cache_dir": str(cache),
            **(extra[0] if extra else {})}
    if STDLIB_ONLY_ALL:
        sets.update(STDLIB_ONLY)
    if MAX_DOCUMENTS:
        sources = sets.get("data.mix") or yaml.safe_load(CONFIG.read_text())["data"]["mix"]
        sets["data.mix"] = [{**src, "max_documents": MAX_DOCUMENTS} for src in sources]
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()]


def launch(cmd: list[str], gpu: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the teacher: alias, folder or .gguf")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--tokens", type=float, default=5e6, help="training tokens per row (both stages)")
    ap.add_argument("--transfer-tokens", type=float, default=1e6, help="of which attention transfer")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--gpus", default="0", help="comma-separated CUDA devices")
    ap.add_argument("--per-gpu", type=int, default=3, help="runs at a time on each GPU")
    ap.add_argument("--eval-rows", type=int, default=32, help="rows of --seq-len scored per corpus")
    ap.add_argument("--untrained", default="", help="rows also scored right after conversion, untrained")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="launch nothing that cannot end by then")
    ap.add_argument("--generate", default="", help="rows to sample generations from")
    ap.add_argument("--max-documents", type=int, default=None, help="training corpus cut (smoke tests)")
    ap.add_argument("--tasks", default="ppl", help="t2r eval tasks for every row and the teacher (ppl,mqar,passkey)")
    ap.add_argument("--samples", type=int, default=3, help="contexts per mqar/passkey cell")
    ap.add_argument("--stdlib-only", action="store_true",
                    help="train every row on Python source only, as the first ablation sweep did")
    args = ap.parse_args()
    global MAX_DOCUMENTS, STDLIB_ONLY_ALL
    MAX_DOCUMENTS = args.max_documents
    STDLIB_ONLY_ALL = args.stdlib_only
    start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    py = [sys.executable, "-m", "t2r.cli"]
    rows = [parse_row(r, args.tokens) for r in args.rows.split(",") if r]
    untrained = [parse_row(r, 0) for r in args.untrained.split(",") if r]
    # tokenize once for every run (the runs share data.cache_dir)
    first = row_overrides(rows[0][0], args.model, 2 * args.seq_len * args.micro_batch, args.seq_len, args.micro_batch,
                          0, cache)
    prep = subprocess.run(py + ["finetune", str(CONFIG), "--output-dir", str(out / "_prep"), "--set",
                                "stages=[{name: finetune, steps: 1, lr: 1.0e-9, lora: null}]"]
                          + [a for s in first if not s.startswith("stages=") for a in ("--set", s)],
                          capture_output=True, text=True, cwd=ROOT)
    if prep.returncode:
        print(prep.stdout[-3000:], prep.stderr[-3000:])
        return 1
    print(f"data ready in {time.time() - start:.0f}s", flush=True)
    gpus = args.gpus.split(",")
    slots = {g: [] for g in gpus}
    queue = [("train", r) for r in rows] + [("untrained", r) for r in untrained]
    running: list[tuple[subprocess.Popen, str, str, float]] = []
    durations = []
    while queue or running:
        for p, kind, name, t0 in list(running):
            if p.poll() is not None:
                running.remove((p, kind, name, t0))
                for g in gpus:
                    if p in slots[g]:
                        slots[g].remove(p)
                durations.append(time.time() - t0)
                print(f"{kind} {name}: exit {p.returncode} after {time.time() - t0:.0f}s", flush=True)
        while queue:
            free = [g for g in gpus if len(slots[g]) < args.per_gpu]
            if not free:
                break
            expect = max(durations) if durations else 0
            if time.time() - start + expect > args.deadline_s:
                print(f"deadline: not launching {[q[1] for q in queue]}", flush=True)
                queue.clear()
                break
            kind, (name, tokens, label) = queue.pop(0)
            gpu = min(free, key=lambda g: len(slots[g]))
            folder = out / (label if kind == "train" else f"untrained-{label}")
            folder.mkdir(exist_ok=True)
            ov = row_overrides(name, args.model, tokens, args.seq_len, args.micro_batch, args.transfer_tokens,
                               cache)
            evaluated = RunFolder(folder).model if kind == "train" else folder / "converted"
            eval_cmd = py + ["eval", str(evaluated), "--seq-len", str(args.seq_len), "--max-rows",
                             str(args.eval_rows), "--branches", "--tasks", args.tasks, "--samples", str(args.samples),
                             "--out", str(folder / "eval.json")]
            if kind == "train":
                train = py + ["finetune", str(CONFIG), "--output-dir", str(folder)] + [a for s in ov for a in
                                                                                        ("--set", s)]
                script = f"{' '.join(map(_q, train))} && {' '.join(map(_q, eval_cmd))}"
            else:
                conv = json.loads(next(s for s in ov if s.startswith("model.conversion="))
                                  .split("=", 1)[1])
                flags = [a for k, v in conv.items() for a in _flag(k, v)]
                convert = py + ["convert", args.model, "--out", str(folder / "converted"), "--overwrite"] + flags
                script = f"{' '.join(map(_q, convert))} && {' '.join(map(_q, eval_cmd))}"
            p = launch(["bash", "-c", script], gpu, folder / "log.txt")
            slots[gpu].append(p)
            running.append((p, kind, label, time.time()))
        time.sleep(2)
    # the teacher on the same rows
    teacher = subprocess.run(py + ["eval", args.model, "--seq-len", str(args.seq_len), "--max-rows",
                                   str(args.eval_rows), "--tasks", args.tasks, "--samples", str(args.samples),
                                   "--out", str(out / "teacher_eval.json")],
                             capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus[0]})
    if teacher.returncode:
        print(teacher.stdout[-2000:], teacher.stderr[-2000:])
    for spec in [r for r in args.generate.split(",") if r]:
        gen_samples(py, out, parse_row(spec, args.tokens)[2], gpus[0])
    table = summarize(out, rows, untrained)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"total {time.time() - start:.0f}s")
    return 0


def _q(s: str) -> str:
    import shlex

    return shlex.quote(str(s))


def _flag(key: str, value) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + key.replace("_", "-")]
    return [flag, str(value)]


PROMPTS = ["What is the capital of France?", "def fibonacci(n):",
           "Once upon a time, in a small village by the sea,"]


def gen_samples(py, out: Path, name: str, gpu: str) -> None:
    model = RunFolder(out / name).model
    if not model.is_dir():
        return
    texts = []
    for prompt in PROMPTS:
        r = subprocess.run(py + ["generate", str(model), "--prompt", prompt, "--max-new-tokens", "48"],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
        texts.append({"prompt": prompt, "completion": r.stdout.strip(), "error": r.returncode and r.stderr[-500:]})
    (out / f"generations-{name.replace('/', '_')}.json").write_text(json.dumps(texts, indent=1))


def summarize(out: Path, rows: list, untrained: list) -> str:
    teacher = json.loads((out / "teacher_eval.json").read_text())["corpora"] if (out / "teacher_eval.json").is_file() \
        else {}
    lines = ["| row | what changes from B | tokens | stdlib ppl (x teacher) | prose ppl (x teacher) | "
             "GSA only: stdlib / prose | window only: stdlib / prose | transfer err. before -> after | "
             "finetune tok/s |", "|---" * 9 + "|"]
    t_line = " | ".join(f"{teacher[c]['model']:.2f}" if c in teacher else "-" for c in ("python-stdlib", "english-prose"))
    lines.append(f"| teacher | softmax attention | - | {t_line} | | | | |")
    results = {"teacher": teacher, "rows": {}}
    for kind, (name, _, label) in [("train", r) for r in rows] + [("untrained", r) for r in untrained]:
        folder = out / (label if kind == "train" else f"untrained-{label}")
        ev = folder / "eval.json"
        summary = RunFolder(folder).summary
        if not ev.is_file():
            lines.append(f"| {label if kind == 'train' else label + ' (untrained)'} | {ROWS[name][0]} | "
                         "did not finish | | | | | | |")
            continue
        full_eval = json.loads(ev.read_text())
        e = full_eval["corpora"]
        s = json.loads(summary.read_text()) if summary.is_file() else {}

        def cell(variant, c):
            if variant not in e.get(c, {}):
                return "-"
            ratio = e[c][variant] / teacher[c]["model"] if c in teacher else float("nan")
            return f"{e[c][variant]:.2f} ({ratio:.2f}x)"

        tr = s.get("transfer_error_per_layer", {})
        terr = (f"{sum(tr['before']) / len(tr['before']):.3g} -> {sum(tr['after']) / len(tr['after']):.3g}"
                if "before" in tr and "after" in tr else "-")
        tps = (s.get("train_tokens_per_s") or {}).get("finetune")
        tps = f"{round(tps):,}" if tps else "-"
        label = label if kind == "train" else f"{label} (untrained)"
        lines.append(f"| {label} | {ROWS[name][0]} | {s.get('tokens_seen', 0):,} | {cell('model', 'python-stdlib')} | "
                     f"{cell('model', 'english-prose')} | {cell('gsa_only', 'python-stdlib')} / "
                     f"{cell('gsa_only', 'english-prose')} | {cell('window_only', 'python-stdlib')} / "
                     f"{cell('window_only', 'english-prose')} | {terr} | {tps} |")
        results["rows"][label] = {"eval": e, "eval_recall": full_eval.get("recall", {}), "summary": s}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return "\n".join(lines + recall_tables(out, results))


def recall_tables(out: Path, results: dict) -> list[str]:
    """One grid per recall task (mqar, passkey): a line per cell, the teacher's accuracy and each row's."""
    teacher_file = out / "teacher_eval.json"
    teacher = json.loads(teacher_file.read_text()).get("recall", {}) if teacher_file.is_file() else {}
    rows = {label: r["eval_recall"] for label, r in results["rows"].items() if r.get("eval_recall")}
    lines = []
    for task in ("mqar", "passkey"):
        cells = list(teacher.get(task, {})) or next((list(g[task]) for g in rows.values() if task in g), [])
        if not cells:
            continue
        labels = [label for label, g in rows.items() if task in g]
        lines += ["", f"| {task} (accuracy) | teacher | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
        for cell in cells + ["mean"]:
            def acc(grid):
                if cell == "mean":
                    vals = [v["model"] for v in grid.values() if "model" in v]
                    return f"{sum(vals) / len(vals):.0%}" if vals else "-"
                return f"{grid[cell]['model']:.0%}" if "model" in grid.get(cell, {}) else "-"
            lines.append(f"| {cell} | {acc(teacher.get(task, {}))} | " + " | ".join(acc(rows[l][task]) for l in labels)
                         + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
