"""The model folders a finetune run writes: OUTPUT/base, OUTPUT/model, OUTPUT/adapter, and a
checkpoint's model/ or adapter/ (what ``t2r export`` takes from it). Every one loads by path."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from ..export.remote_code import make_loadable_by_path
from .run_folder import ACCELERATE_STATE, MODEL, RunFolder


def save_model_folder(model, tokenizer, folder: Path, state_dict=None) -> None:
    """``model`` (or ``state_dict`` in its layout) and ``tokenizer`` saved to ``folder``, written
    beside it and renamed into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    _plain_architectures(tmp / "config.json")
    tokenizer.save_pretrained(tmp)
    make_loadable_by_path(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def save_adapter(peft_model, run: RunFolder, folder: Path, state_dict=None) -> None:
    """The LoRA adapter (and the GSA modules it saves in full) to ``folder``, pointing at OUTPUT/base."""
    peft_model.peft_config["default"].base_model_name_or_path = str(run.base.resolve())
    peft_model.save_pretrained(folder, state_dict=state_dict)


def link_checkpoint_model(model, tokenizer, checkpoint: Path) -> None:
    """checkpoint/model: the model's config and tokenizer, and as its weights a hard link to the
    checkpoint's own (accelerate/model.safetensors; no copy)."""
    folder = checkpoint / MODEL
    folder.mkdir()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    os.link(checkpoint / ACCELERATE_STATE / "model.safetensors", folder / "model.safetensors")


def merged_from_folders(run: RunFolder):
    """OUTPUT/base with OUTPUT/adapter merged in, loaded on the CPU (the FSDP-sharded model cannot
    merge in place)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run.base, use_safetensors=True)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, run.adapter).merge_and_unload()


def _plain_architectures(config_file: Path) -> None:
    """FSDP2 swaps the model's class for an "FSDP<name>" subclass, which save_pretrained records."""
    if not config_file.is_file():
        return
    data = json.loads(config_file.read_text())
    names = data.get("architectures") or []
    if any(n.startswith("FSDP") for n in names):
        data["architectures"] = [n.removeprefix("FSDP") for n in names]
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

