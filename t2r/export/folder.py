"""``t2r export``: write a Hub-ready folder (weights, config with auto_map, tokenizer, generation
config, flat modeling code, model card, manifest) from a run, a checkpoint or a converted folder.

The folder is written in a temporary folder beside ``--out`` and renamed into place at the end,
so a failure never leaves a half-written export (nor touches the one it would replace).
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import DTYPE_NAMES, torch_dtype
from ..errors import T2RError
from ..hub import HUB_ID, public_name
from ..models.modeling_t2r import keeps_fp32
from ..paths import check_out_dir, staged_folder
from .card import CardInfo, model_card, relocate_card
from .load import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, TOKENIZER_DIRS, TOKENIZER_FILES, Source, inspect_source,
                   load_merged, load_model, read_json, read_lora_config, validate_adapter, validate_model_folder)
from .push import check_push, push_folder
from .remote_code import AUTO_MAP, check_loadable, write_remote_code

MODES = ("auto", "merge", "adapter")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '300KiB' -> 307_200 (units as transformers reads them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise T2RError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "").upper()])


@dataclass
class ExportOptions:
    mode: str = "auto"  # auto: merge the LoRA adapter if there is one | merge | adapter (adapter only)
    dtype: str | None = None  # bf16 | fp16 | fp32; None keeps the source's
    max_shard_size: str = "5GB"
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None  # the Hub branch to push to (made if missing); None: main
    commit_message: str | None = None
    overwrite: bool = False
    license: str | None = None
    base_id: str | None = None  # adapter exports: where users find the converted base
    eval_results: dict | None = None  # the JSON of `t2r eval --out`, for the card


def _version() -> str:
    from t2r import __version__

    return __version__


def cast_model(model, dtype: torch.dtype) -> None:
    """Cast floating weights to ``dtype`` in place, except the modules the model keeps in fp32 (g_norm)."""
    for module_name, module in model.named_modules():
        fp32 = keeps_fp32(module_name)
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and t.is_floating_point():
                    t.data = t.data.to(torch.float32 if fp32 else dtype)
    model.config.dtype = dtype


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not any(n in names for n in ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")):
        raise T2RError(f"{src} has no tokenizer (tokenizer.json, tokenizer.model, ...); copy the teacher's tokenizer "
                       "files into it (t2r convert saves them), then export again")
    for n in names:
        shutil.copy2(src / n, dst / n)
    for d in TOKENIZER_DIRS:
        if (src / d).is_dir():
            shutil.copytree(src / d, dst / d)
            names.append(d)
    return names


def _check_out(out: Path, src: Source, overwrite: bool) -> None:
    check_out_dir(out, overwrite)
    o, s = out.resolve(), src.path.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise T2RError(f"--out {out} overlaps SOURCE {src.path}; write the export to a folder outside the source")


def _resolve_mode(src: Source, mode: str) -> str:
    """model (export the full model as it is) | merge (base + adapter merged here) | adapter."""
    if src.kind == "adapter-export":
        raise T2RError(f"{src.path} is already an adapter export; upload it with: t2r export {src.path} "
                       "--push-to-hub ORG/NAME")
    if not src.has_adapter:
        if mode != "auto":
            flag = "--merge-lora" if mode == "merge" else "--adapter-only"
            raise T2RError(f"{src.path} has no LoRA adapter (no adapter/ folder: the run trained all weights, or this "
                           f"is a converted folder); drop {flag}")
        return "model"
    if src.base_dir is None:
        if mode == "auto":
            return "model"  # model/ is the run's merged model
        raise T2RError(f"{src.path} has adapter/ but no base/ (the converted model it goes on), so the adapter can "
                       "be neither merged nor checked; export without --merge-lora/--adapter-only to take model/ "
                       "(already merged by the run)")
    return "adapter" if mode == "adapter" else "merge"


def _files_and_sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _card_info(src: Source, config: dict, fmt: str, location: str, dtype: str, options: ExportOptions,
               **extra) -> CardInfo:
    return CardInfo(config=config, fmt=fmt, location=location, dtype=dtype, summary=src.summary,
                    source_kind=src.kind, source_name=src.path.name, license=options.license,
                    t2r_version=_version(), eval_results=options.eval_results, **extra)


def write_model(tmp: Path, src: Source, mode: str, options: ExportOptions, location: str, log) -> dict:
    if mode == "merge":
        log(f"merging the LoRA adapter {src.adapter_dir} into {src.base_dir} (in fp32)")
        model, saved = load_merged(src.base_dir, src.adapter_dir)
        files_from = src.model_dir or src.base_dir
    else:
        log(f"loading {src.model_dir}")
        model = load_model(src.model_dir)
        saved, files_from = model.config.dtype, src.model_dir
    target = torch_dtype(options.dtype) if options.dtype else (saved if isinstance(saved, torch.dtype) else
                                                          getattr(torch, str(saved or "float32")))
    cast_model(model, target)
    model.config.auto_map = dict(AUTO_MAP)
    model.config.base_model_name_or_path = public_name(model.config.base_model_name_or_path)
    gen = files_from / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(files_from)
    model.save_pretrained(tmp, max_shard_size=parse_size(options.max_shard_size))
    copy_tokenizer(files_from, tmp)
    modeling, notes = write_remote_code(tmp)
    for note in notes:
        log(f"note: {note}")
    config = validate_model_folder(tmp)  # what was written is what the config describes
    info = _card_info(src, config.to_dict(), "model", location, _dtype_name(target), options,
                      merged_lora=mode == "merge" or src.has_adapter, modeling_files=modeling)
    (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
    return {"format": "model", "dtype": _dtype_name(target), "merged_lora": info.merged_lora}


def write_adapter(tmp: Path, src: Source, options: ExportOptions, location: str, log) -> dict:
    from safetensors.torch import load_file, save_file

    base_config = validate_model_folder(src.base_dir)
    validate_adapter(src.adapter_dir, base_config, src.base_dir)
    lora = read_lora_config(src.adapter_dir)
    tensors = load_file(src.adapter_dir / ADAPTER_WEIGHTS)
    if options.dtype:
        tensors = {k: (v.to(torch.float32 if keeps_fp32(k) else torch_dtype(options.dtype))
                       if v.is_floating_point() else v) for k, v in tensors.items()}
    save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    base_ref = options.base_id or str(src.base_dir.resolve())
    if not options.base_id:
        log(f"note: {ADAPTER_CONFIG} names the base by its local path {base_ref}; pass --base-id ORG/NAME to name "
            "where users will find the converted base (e.g. its own export on the Hub)")
    adapter_config = read_json(src.adapter_dir / ADAPTER_CONFIG, "the adapter config")
    adapter_config.update(base_model_name_or_path=base_ref, inference_mode=True)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_tokenizer(src.base_dir, tmp)
    dtypes = sorted({_dtype_name(v.dtype) for k, v in tensors.items() if "lora_" in k}) or ["float32"]
    info = _card_info(src, base_config.to_dict(), "adapter", location, "/".join(dtypes), options,
                      lora={"r": lora.r, "lora_alpha": lora.lora_alpha, "target_modules": list(lora.target_modules),
                            "modules_to_save": list(lora.modules_to_save or [])},
                      base_location=base_ref)
    (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
    base = {"base_model_name_or_path": base_ref, "teacher": public_name(base_config.base_model_name_or_path),
            "config": {k: getattr(base_config, k) for k in (
                "base_model_type", "num_hidden_layers", "hidden_size", "num_key_value_heads", "head_dim",
                "mixer", "gsa_layers", "num_slots", "gate_logit_normalizer", "feature_map", "use_rope")}}
    return {"format": "adapter", "dtype": "/".join(dtypes), "base": base}


def verify_export(path: Path) -> dict:
    """Check an existing export before uploading it: every file the manifest lists, at its size."""
    manifest = read_json(path / MANIFEST, "the export manifest")
    for name, size in (manifest.get("files") or {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise T2RError(f"{f} is {'missing' if not f.is_file() else 'changed'} since the export; export again")
    if manifest.get("format") == "model":
        validate_model_folder(path)
        check_loadable(path, sorted(n for n in manifest["files"] if n.endswith(".py")))
    return manifest


def export(source: str | Path, out: str | Path | None, options: ExportOptions | None = None, log=print) -> Path:
    """Export SOURCE to ``out`` (and push it); with ``out`` None, push SOURCE, an existing export."""
    options = options or ExportOptions()
    if options.mode not in MODES:
        raise ValueError(f"mode {options.mode!r} is not one of {MODES}")
    if options.dtype is not None and options.dtype not in DTYPE_NAMES:
        raise T2RError(f"--dtype {options.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    parse_size(options.max_shard_size)
    if options.push_to_hub:
        check_push(options.push_to_hub, options.revision)
    elif options.revision or options.commit_message:
        raise T2RError("--revision and --commit-message apply to --push-to-hub; add --push-to-hub ORG/NAME or drop "
                       "them")
    src = inspect_source(source)
    if out is None:
        if not options.push_to_hub or src.kind not in ("export", "adapter-export") or src.hub_id:
            raise T2RError("--out is required (only an existing export folder can be pushed as it is: "
                           "t2r export EXPORT_DIR --push-to-hub ORG/NAME)")
        if options.eval_results:
            raise T2RError("--eval-results goes into the card of a new export, and an existing export is pushed as "
                           "it is; export again with --out DIR --eval-results FILE")
        manifest = verify_export(src.path)
        name_repo(src.path, manifest, options.push_to_hub)
        _push(src.path, options, log)
        return src.path
    out = Path(out).expanduser()
    _check_out(out, src, options.overwrite)
    mode = _resolve_mode(src, options.mode)
    if options.push_to_hub and mode == "adapter" and not (options.base_id and HUB_ID.match(options.base_id)):
        raise T2RError(f"--push-to-hub of an adapter needs --base-id ORG/BASE, the Hub repo of the converted model "
                       f"it goes on (push that first: t2r export {src.base_dir} --out DIR --push-to-hub ORG/BASE); "
                       "a local path means nothing on the Hub")
    location = options.push_to_hub or str(out.resolve())
    with staged_folder(out) as tmp:
        if mode == "adapter":
            meta = write_adapter(tmp, src, options, location, log)
        else:
            meta = write_model(tmp, src, mode, options, location, log)
        manifest = {"t2r_version": _version(), **meta, "source_kind": src.kind, "location": location,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "files": _files_and_sizes(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    total = sum(manifest["files"].values())
    log(f"exported {meta['format']} ({meta['dtype']}) to {out}: {len(manifest['files']) + 1} files, "
        f"{total / 2**20:,.1f} MiB")
    if options.push_to_hub:
        _push(out, options, log)
    return out


def _push(folder: Path, options: ExportOptions, log) -> None:
    push_folder(folder, options.push_to_hub, options.private, options.revision, options.commit_message, log)


def name_repo(folder: Path, manifest: dict, repo_id: str) -> None:
    """An existing export pushed to ``repo_id``: its card (written naming its local folder, or another repo)
    now names the repo, and the manifest records the new card and where it points."""
    old = manifest.get("location") or str(folder.resolve())  # exports made before the manifest recorded it
    if old == repo_id:
        return
    card = folder / "README.md"
    card.write_text(relocate_card(card.read_text(encoding="utf-8"), old, repo_id), encoding="utf-8")
    manifest.update(location=repo_id, files=_files_and_sizes(folder))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
