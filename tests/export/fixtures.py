"""Folders ``t2r export`` reads, built from real components: tiny converted models saved by
save_pretrained, real peft LoRA adapters with trained-looking weights, a run_summary.json, and
a checkpoint folder, in the layout a finetune run writes (OUTPUT/model, base, adapter, ...)."""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from t2r.convert import ConversionOptions, convert_model
from t2r.tiny import tiny_teacher
from t2r.train.stages import gsa_modules_present
from t2r.train.run_folder import ACCELERATE_STATE, ADAPTER, BASE, MODEL, TRAINER_STATE, RunFolder

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IDS = torch.tensor([[5, 77, 180, 33, 2, 250, 91, 14, 66, 120, 7, 201, 45, 99],
                    [190, 3, 58, 211, 76, 12, 140, 88, 31, 254, 9, 160, 22, 71]])


def save_converted(folder: Path, family: str = "llama", seed: int = 0, dtype=torch.float32, **options):
    """Convert a tiny random teacher and save it like ``t2r convert`` does; return the model."""
    teacher, tok = tiny_teacher(family, seed=seed)
    small = {"num_slots": 8} if options.get("mixer", "gsa") == "gsa" else {}  # slots: GSA's option alone
    model = convert_model(teacher.to(dtype), ConversionOptions(**{**small, **options}),
                          source=f"tiny-random-{family}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def summary(lora: bool, **overrides) -> dict:
    s = {"base_model": "smollm2-135m", "base_model_type": "llama",
         "conversion": ConversionOptions(num_slots=8, softmax_layers="2").model_dump(),
         "gsa_layers": [0, 1, 3], "num_hidden_layers": 4, "tokens_seen": 1_234_567,
         "stages": [{"name": "attention_transfer", "steps": 40, "tokens": 163_840, "lora": None},
                    {"name": "finetune", "steps": 260, "tokens": 1_070_727,
                     "lora": {"r": 4, "alpha": 8} if lora else None}],
         "eval": {"teacher_ppl": 11.52, "converted_ppl_before": 2345.6, "ppl_after": 14.07, "eval_tokens": 65536},
         "license": "apache-2.0", "date": "2025-01-01"}
    s.update(overrides)
    return s


def make_run(root: Path, lora: bool = True, family: str = "llama", checkpoint: bool = False, **options):
    """OUTPUT/{model, base, adapter, run_summary.json} (+ checkpoints/step-0000300 with the same
    model/base/adapter and training state). Returns (root, reference logits on IDS, model): with
    LoRA the reference is the unmerged peft model's and ``model`` the peft model."""
    from peft import LoraConfig, get_peft_model

    options = {"softmax_layers": "2", **options}
    root.mkdir(parents=True, exist_ok=True)
    run = RunFolder(root)
    base = save_converted(run.base, family, **options)
    if lora:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers, about a name peft calls
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                    modules_to_save=gsa_modules_present(base), task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # as if trained: LoRA B is zero at init, and the saved copies change
            for name, p in model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.peft_config["default"].base_model_name_or_path = "/gone/old-machine/run/base"  # stale
        with warnings.catch_warnings():  # peft: no config at the stale path, transformers: a deprecated name
            warnings.simplefilter("ignore")
            model.save_pretrained(run.adapter)
        with torch.no_grad():
            reference = model(IDS).logits
        merged = model.merge_and_unload()
    else:
        import shutil

        shutil.rmtree(run.base)
        merged = base
        with torch.no_grad():
            for name, p in merged.named_parameters():
                p.add_(0.01 * torch.randn_like(p))
            reference = merged(IDS).logits
        model = merged
    merged.save_pretrained(run.model)
    tiny_teacher(family)[1].save_pretrained(run.model)
    if lora:
        tiny_teacher(family)[1].save_pretrained(run.base)
    run.summary.write_text(json.dumps(summary(lora)))
    if checkpoint:
        import shutil

        step = run.checkpoint(300)
        step.mkdir(parents=True)
        for name in (MODEL, BASE, ADAPTER):
            if (root / name).is_dir():
                shutil.copytree(root / name, step / name)
        (step / TRAINER_STATE).write_text(json.dumps({"step": 300}))
        (step / ACCELERATE_STATE).mkdir()
        (step / ACCELERATE_STATE / "optimizer.bin").write_bytes(b"training state: never read by export")
    return root, reference, model


SITE = Path(site.getsitepackages()[0])
HIDDEN = ("__editable__", "t2r", "triton", "peft")


def no_t2r_site(tmp: Path, hide_triton: bool = True) -> Path:
    """A site-packages of symlinks to this environment's, minus t2r (its editable-install finder and
    metadata), peft and, unless told otherwise, triton: a fresh environment without t2r."""
    site_dir = tmp / "site-packages"
    site_dir.mkdir(parents=True)
    hidden = HIDDEN if hide_triton else tuple(h for h in HIDDEN if h != "triton")
    for entry in SITE.iterdir():
        if entry.name.lower().startswith(hidden) or entry.suffix == ".pth":
            continue
        (site_dir / entry.name).symlink_to(entry)
    return site_dir


BOOT = """
import sys
sys.path.append({site!r})
"""


def run_without_t2r(code: str, site_dir: Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in ``python -I -S`` (no site, no user site, no PYTHON* variables, no cwd on sys.path)
    with ``site_dir`` as its only site-packages."""
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "HF_HOME": str(cwd / "hf"),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-I", "-S", "-c", BOOT.format(site=str(site_dir)) + code],
                          capture_output=True, text=True, cwd=cwd, env=environ, timeout=300)
