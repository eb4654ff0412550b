"""End to end, teacher and converted side by side in one run: LoRA training throughput and peak
memory, HF-generate decoding, batch-1 generation, `t2r convert` wall time and host memory, and
(with --smollm2) a SmolLM2-135M T2R finetune. Prints one table with ratios against the teacher.

    python scripts/bench_e2e.py                      # 7B Mistral shape, random weights (needs a GPU)
    python scripts/bench_e2e.py --smollm2 PATH/SmolLM2-135M-Instruct.Q4_1.gguf
    python scripts/bench_e2e.py --tiny               # a small shape on any device (checks the script)

Random weights are enough for speed and memory: the work per token does not depend on the values.
Both models train the same way: bf16 autocast, gradient checkpointing, LoRA r=8 on q/k/v/o (the
converted model also trains its new GSA parameters, as `t2r finetune` does), AdamW; each training row
once per --recipes: as peft and torch give it (plain), with what `t2r finetune` adds on a GPU
(t2r: peft's input casts off, and liger's fused RMSNorm and SwiGLU as model.fused_layers: auto takes
them), and with each decoder layer compiled instead (compiled: model.compile: always, which compiles
under gradient checkpointing); the teacher too.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MISTRAL_7B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  intermediate_size=14336, num_layers=32, vocab_size=32000)
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
            num_layers=2, vocab_size=512)


# --recipes: how both models of a training row step
RECIPES = {"plain": "peft and torch layers as they come",
           "t2r": "`t2r finetune`'s step with model.fused_layers: auto: peft's input casts off, liger RMSNorm and "
                  "SwiGLU on CUDA",
           "compiled": "`t2r finetune`'s step with model.compile: always: each decoder layer under torch.compile, "
                       "peft's input casts off, liger's layers off (compiled layers fuse their own)"}


def free_memory(device: torch.device) -> None:
    """Collect what a dropped model left in reference cycles, and give its cached GPU blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def teacher_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    s = dict(shape)
    config = AutoConfig.for_model("mistral", num_hidden_layers=s.pop("num_layers"), max_position_embeddings=65536,
                                  attn_implementation="sdpa", **s)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def converted_model(teacher):
    from t2r.convert import ConversionOptions, convert_model

    return convert_model(teacher, ConversionOptions()).to(teacher.device).eval()


def with_lora(model, converted: bool):
    from peft import LoraConfig, get_peft_model

    from t2r.train.stages import gsa_modules_present

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        modules_to_save=gsa_modules_present(model) if converted else None, task_type="CAUSAL_LM")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return get_peft_model(model, config)


def tune_like_t2r(model, compiled: bool = False):
    """The ``t2r`` recipe: liger's RMSNorm and SwiGLU kernels in ``model`` (ours or transformers' Mistral
    modules) where `t2r finetune` takes them with model.fused_layers: auto (on CUDA; the default, off,
    takes torch's), with ``compiled`` each decoder layer compiled instead (model.compile: always, which
    compiles under gradient checkpointing); a context factory to step in: peft's input casts off, as
    `t2r finetune` steps."""
    from transformers.models.mistral.modeling_mistral import MistralMLP, MistralRMSNorm

    from t2r.layers.norm import RMSNorm
    from t2r.models.modeling_t2r import MLP
    from t2r.train.fused_layers import resolve_fused_layers, use_fused_layers
    from t2r.train.stages import lora_input_casts_off

    if resolve_fused_layers("auto", model.device, compiled=compiled)[0] == "liger":
        use_fused_layers(model, norm_classes=(RMSNorm, MistralRMSNorm), mlp_classes=(MLP, MistralMLP))
    if compiled:
        from t2r.train.compiled_layers import compile_layers

        compile_layers(model)
    return lambda: lora_input_casts_off(model)


def train_rate(model, batch: int, seq: int, vocab: int, steps: int, device: torch.device, profile: bool = False,
               recipe: str = "plain"):
    """Tokens/s of full optimizer steps (forward, backward, AdamW) after two warm-up steps; peak GiB; GiB
    allocated before the first step; with ``profile``, one more step under torch.profiler: its kernels by
    device time (t2r.train.profiling's report), else None. ``recipe``: plain (peft and torch layers as
    they come) or t2r (tune_like_t2r)."""
    model.train()
    step_context = contextlib.nullcontext if recipe == "plain" else tune_like_t2r(model, recipe == "compiled")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    reset_peak(device)
    held = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    def step():
        # the backward inside the forward's settings, as `t2r finetune` steps: gradient checkpointing's
        # recompute must run the graphs the forward compiled
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), step_context():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = None
    for i in range(steps + 2):
        if i == 2:
            sync(device)
            t0 = time.perf_counter()
        step()
    sync(device)
    rate = batch * seq * steps / (time.perf_counter() - t0)
    table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        from t2r.train.profiling import report

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            t1 = time.perf_counter()
            step()
            sync(device)
            wall = time.perf_counter() - t1
        table = report(prof, 1, 1, wall)
    del opt
    return rate, peak_gib(device), held, table


@torch.no_grad()
def decode_rate(model, batch: int, prompt: int, new: int, vocab: int, device: torch.device) -> tuple[float, float]:
    """HF generate, greedy: prefill seconds (one new token) and decode tokens/s (the other new tokens)."""
    model.eval()
    model.config.use_cache = True
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(device)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    sync(device)
    total = time.perf_counter() - t0
    return prefill, batch * (new - 1) / max(total - prefill, 1e-9)


@torch.no_grad()
def static_rate(model, batch: int, prompt: int, new: int, vocab: int, device: torch.device) -> tuple[float, float]:
    """t2r's static decoding (T2RStaticCache, a CUDA-graphed step, t2r.generation.static_generate): prefill
    seconds and decode tokens/s, as decode_rate measures them."""
    from t2r.generation import static_generate
    from t2r.models import T2RStaticCache

    model.eval()
    cache = T2RStaticCache(model.config, batch, prompt + new)
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    static_generate(model, ids[:, :16], max_new_tokens=4, cache=cache)  # warm-up: graph captured
    times = []
    for n in (1, new):
        sync(device)
        t0 = time.perf_counter()
        static_generate(model, ids, max_new_tokens=n, cache=cache)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[0], batch * (new - 1) / max(times[1] - times[0], 1e-9)


def convert_cost(teacher, workdir: Path) -> tuple[float, float, float]:
    """`t2r convert` on a saved folder in a fresh process: wall seconds, its peak RSS and the checkpoint size (GiB)."""
    src, out = workdir / "teacher", workdir / "converted"
    from t2r.tiny import byte_level_tokenizer

    teacher.save_pretrained(src)
    byte_level_tokenizer().save_pretrained(src)  # convert copies the tokenizer; its vocabulary does not matter here
    size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run([sys.executable, '-m', 't2r.cli', 'convert', sys.argv[1], '--out', sys.argv[2]], "
            "capture_output=True, text=True); "
            "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.stderr.write(r.stderr[-2000:])")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    rc, wall, rss_kib = r.stdout.split()
    if rc != "0":
        raise SystemExit(f"t2r convert failed:\n{r.stderr}")
    return float(wall), int(rss_kib) / 2**20, size


def smollm2_finetune(gguf: str, steps: int, batch: int, seq: int, workdir: Path,
                     dtype: str = "auto", extra: dict | None = None) -> tuple[float, float | None]:
    """The shipped SmolLM2 config with LoRA + KL for ``steps`` finetune steps: median tokens/s, peak GiB.
    ``dtype``: the converted weights' (``model.conversion.dtype``; the trained ones stay fp32); ``extra``:
    more config keys to set (dotted key -> value)."""
    out = workdir / "smollm2"
    stages = [{"name": "attention_transfer", "steps": 2, "lr": 1e-2},
              {"name": "finetune", "steps": steps, "lr": 1e-3, "kl_weight": 1.0,
               "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}]
    sets = {"model.source": gguf, "model.conversion.dtype": dtype, "stages": stages, "eval.before": False, "eval.teacher": False,
            "eval.every_steps": 100000, "checkpoint.every_steps": 100000, "logging.progress_bar": False,
            "logging.tensorboard": False, "data.mix": [{"dataset": "python-stdlib"}], "data.seq_len": seq,
            "batch.micro_batch_size": batch, "batch.grad_accum": 1,
            # the last two steps (after 2 transfer steps) under torch.profiler (OUTPUT/profile.txt); the median leaves them out
            "logging.profile_steps": [steps + 1, steps + 2], **(extra or {})}
    cmd = [sys.executable, "-m", "t2r.cli", "finetune", str(ROOT / "configs/smollm2-135m-gsa.yaml"), "--output-dir",
           str(out)] + [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"SmolLM2 finetune failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    from t2r.train.run_folder import RunFolder

    summary = json.loads(RunFolder(out).summary.read_text())  # the run's own median (first step left out)
    profile = RunFolder(out).profile.read_text().splitlines()
    return summary["train_tokens_per_s"]["finetune"], summary.get("peak_gpu_memory_gib"), profile


def fmt(x, spec=",.0f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a small shape (any device): checks the script runs")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per training row")
    ap.add_argument("--train", default="8x2048,2x8192", help="training shapes, BATCHxSEQ, comma-separated")
    ap.add_argument("--decode", default="16x4096", help="HF generate shapes, BATCHxPROMPT, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--recipes", default="plain,t2r",
                    help="training rows, comma-separated: " + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
    ap.add_argument("--skip", default="", help="sections to skip: train,decode,generate,convert")
    ap.add_argument("--smollm2", default=None, help="a SmolLM2-135M-Instruct GGUF or folder: also time its finetune")
    ap.add_argument("--profile-train", action="store_true",
                    help="after each training row's timed steps, profile one more step (kernels by device time)")
    ap.add_argument("--smollm2-steps", type=int, default=30)
    ap.add_argument("--smollm2-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="the converted weights' dtype in its finetune (auto: as loaded; trained weights stay fp32)")
    ap.add_argument("--smollm2-set", action="append", default=[], metavar="KEY=VALUE",
                    help="another config key of its finetune (value parsed as YAML), e.g. model.fused_layers=off")
    ap.add_argument("--smollm2-shape", default="8x2048", help="BATCHxSEQ of its finetune steps")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("no CUDA GPU here: the 7B shape needs one; use --tiny to check the script on this device")
    shape = TINY if args.tiny else MISTRAL_7B
    train_shapes = ["2x64", "1x256"] if args.tiny else args.train.split(",")
    decode_shapes = ["2x128"] if args.tiny else args.decode.split(",")
    skip = set(args.skip.split(","))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = shape["vocab_size"]
    rows = []  # (measure, teacher, converted, ratio)
    profiles = []  # --profile-train reports

    def add(measure, teacher, converted, higher_is_better=True, spec=",.0f"):
        ratio = None
        if teacher and converted:
            ratio = converted / teacher if higher_is_better else teacher / converted
        rows.append((measure, fmt(teacher, spec), fmt(converted, spec), "-" if ratio is None else f"{ratio:.2f}x"))
        print(rows[-1], flush=True)

    if any("=" not in kv for kv in args.smollm2_set):
        raise SystemExit(f"--smollm2-set takes KEY=VALUE, got {args.smollm2_set}")
    recipes = args.recipes.split(",")
    if not set(recipes) <= set(RECIPES):
        raise SystemExit(f"--recipes: choose from {', '.join(RECIPES)}, got {args.recipes!r}")
    for b, s in ([tuple(map(int, x.split("x"))) for x in train_shapes] if "train" not in skip else []):
        rates = {}  # recipe -> (teacher tok/s, converted tok/s)
        for recipe in recipes:
            results = []
            for converted in (False, True):
                teacher = teacher_model(shape, device, dtype)
                model = converted_model(teacher) if converted else teacher
                del teacher
                model = with_lora(model, converted)
                results.append(train_rate(model, b, s, vocab, args.steps, device, args.profile_train, recipe))
                del model
                free_memory(device)  # a swapped forward (module -> bound method -> module) is a cycle: collect it
            rates[recipe] = (results[0][0], results[1][0])
            tag = "" if recipe == "plain" else f", {recipe} step"
            add(f"LoRA train tok/s, {b} x {s}{tag}", results[0][0], results[1][0])
            add(f"peak GPU GiB, LoRA train {b} x {s}{tag}", results[0][1], results[1][1], higher_is_better=False,
                spec=".1f")
            add(f"  of which held before the first step (weights, adapters), {b} x {s}{tag}", results[0][2],
                results[1][2], higher_is_better=False, spec=".1f")
            for name, r in zip(("teacher", "t2r GSA"), results):
                if r[3]:
                    profiles.append(f"{name}, LoRA train {b} x {s}{tag}, one profiled step:\n{r[3]}")
        for recipe in (r for r in recipes if r != "plain" and "plain" in rates):
            add(f"LoRA train tok/s, {b} x {s}: plain teacher, converted {recipe} step", rates["plain"][0],
                rates[recipe][1])

    if not {"decode", "generate", "convert"} <= skip:
        teacher = teacher_model(shape, device, dtype)
        model = converted_model(teacher).to(dtype)
        for b, p in ([tuple(map(int, x.split("x"))) for x in decode_shapes] if "decode" not in skip else []):
            t_pre, t_rate = decode_rate(teacher, b, p, args.new_tokens, vocab, device)
            m_pre, m_rate = decode_rate(model, b, p, args.new_tokens, vocab, device)
            add(f"HF generate {b} x {p} prompt: decode tok/s", t_rate, m_rate)
            add(f"HF generate {b} x {p} prompt: prefill s", t_pre, m_pre, higher_is_better=False, spec=".3f")
            s_pre, s_rate = static_rate(model, b, p, args.new_tokens, vocab, device)
            add(f"{b} x {p} prompt, t2r static decoding: decode tok/s (teacher: HF generate)", t_rate, s_rate)
            add(f"{b} x {p} prompt, t2r static decoding: prefill s", t_pre, s_pre, higher_is_better=False,
                spec=".3f")
        if "generate" not in skip:
            _, t_rate = decode_rate(teacher, 1, 16, args.new_tokens, vocab, device)
            _, m_rate = decode_rate(model, 1, 16, args.new_tokens, vocab, device)
            add(f"generate, batch 1, {args.new_tokens} new tokens: tok/s", t_rate, m_rate)
            _, s_rate = static_rate(model, 1, 16, args.new_tokens, vocab, device)
            add(f"generate, batch 1, {args.new_tokens} new tokens, t2r static: tok/s", t_rate, s_rate)
        del model
        if "convert" not in skip:
            with tempfile.TemporaryDirectory() as tmp:
                wall, rss, size = convert_cost(teacher.cpu(), Path(tmp))
            add("t2r convert: wall s", None, wall, spec=".1f")
            add("t2r convert: peak host RSS / checkpoint size", None, rss / size, spec=".2f")
        del teacher

    if args.smollm2:
        with tempfile.TemporaryDirectory() as tmp:
            b, s = map(int, args.smollm2_shape.split("x"))
            extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.smollm2_set)}
            rate, peak, profile = smollm2_finetune(args.smollm2, args.smollm2_steps, b, s, Path(tmp), args.smollm2_dtype,
                                                   extra)
        weights = "" if args.smollm2_dtype == "auto" else f", {args.smollm2_dtype} weights"
        weights += "".join(f", {kv}" for kv in args.smollm2_set)
        add(f"SmolLM2-135M finetune (LoRA + KL, {b} x {s}{weights}), median tok/s", None, rate)
        add("SmolLM2-135M finetune peak GPU GiB", None, peak, spec=".1f")

    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{time.strftime('%Y-%m-%d')}, {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"shape {'tiny' if args.tiny else 'Mistral-7B'}\n")
    print("| measure | teacher (softmax, SDPA) | t2r GSA | ratio (better > 1) |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for p in profiles:
        print("\n" + p)
    if args.smollm2:
        print("\nSmolLM2-135M finetune, the two profiled steps (torch.profiler: the step's phases by host time, the "
              "kernels by GPU time, the host's operators by CPU time):\n")
        print("\n".join(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
