"""What ``t2r export`` reads, and how: find the model (and LoRA adapter) in a SOURCE folder, check
every weight file against its config before anything is loaded, and load weights from
safetensors only (a pickle can run code when it is loaded: t2r never opens one)."""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import T2RError
from ..hub import PICKLE_SUFFIXES, converted_folder, hub_repo
from ..train import run_folder

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "t2r_export.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_DIRS = ("additional_chat_templates",)
# every kind of file an export holds: a re-push deletes the Hub repo's files of these kinds that the new
# export lacks (stale shards, an earlier adapter, renamed modeling files); files of other kinds stay
EXPORT_PATTERNS = ["*.safetensors", WEIGHTS_INDEX, "*.py", "config.json", "generation_config.json", ADAPTER_CONFIG,
                   MANIFEST, "README.md", *TOKENIZER_FILES, *(f"{d}/*" for d in TOKENIZER_DIRS)]
REMAKE = "restore it from a copy, or make it again (t2r convert, a finetune run, or t2r export)"
SOURCE_HELP = ("SOURCE is a finetune run's output folder, one of its checkpoints (OUTPUT/checkpoints/step-N), "
               "a converted folder (t2r convert), an export, or the Hub id (ORG/NAME) of a converted model")


@dataclass
class Source:
    """Where the pieces of a SOURCE are. ``kind``: run | checkpoint | converted | export | adapter-export."""

    path: Path
    kind: str
    model_dir: Path | None = None  # the full model (merged, where the run used LoRA)
    base_dir: Path | None = None  # the converted model the adapter goes on
    adapter_dir: Path | None = None
    summary: dict | None = None
    summary_path: Path | None = None
    hub_id: str | None = None  # SOURCE was this Hub repo; ``path`` is its download

    @property
    def has_adapter(self) -> bool:
        return self.adapter_dir is not None


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise T2RError(f"{path}: cannot read {what} ({e}); restore the file or export from the run's output again")
    if not isinstance(data, dict):
        raise T2RError(f"{path}: {what} must be a JSON object")
    return data


def _find_summary(path: Path, kind: str) -> Path | None:
    """run_summary.json of the run a folder belongs to: in it, beside a run's model/, or two levels
    above a checkpoint (OUTPUT/checkpoints/step-N). Not for OUTPUT/base: the summary describes the
    finetuned model, not the one finetuning started from."""
    candidates = [path / run_folder.SUMMARY]
    if kind == "checkpoint":
        candidates.append(path.parent.parent / run_folder.SUMMARY)
    if path.name == run_folder.MODEL:
        candidates.append(path.parent / run_folder.SUMMARY)
    return next((c for c in candidates if c.is_file()), None)


def inspect_source(source: str | Path) -> Source:
    """Find the model, base and adapter folders of SOURCE; raise T2RError when it is none of the kinds.
    A Hub id (ORG/NAME) of a converted model or export is downloaded (or read from the cache offline)."""
    path = Path(source).expanduser()
    repo = hub_repo(source) if not path.exists() else None
    if repo is not None:
        folder = converted_folder(repo)
        if folder is None:
            raise T2RError(f"{repo} on the Hub is not a converted model (its config.json is not model_type 't2r'); "
                           f"convert it first: t2r convert {repo} --out DIR, then export DIR")
        path = folder
    if not path.exists():
        raise T2RError(f"{path} does not exist; {SOURCE_HELP}")
    if not path.is_dir():
        raise T2RError(f"{path} is a file, not a folder; {SOURCE_HELP}")
    if (path / run_folder.MODEL).is_dir() or (path / run_folder.ADAPTER).is_dir():
        kind = "checkpoint" if run_folder.is_checkpoint(path) else "run"
        src = Source(path, kind)
        for field, name in (("model_dir", run_folder.MODEL), ("base_dir", run_folder.BASE),
                            ("adapter_dir", run_folder.ADAPTER)):
            if (path / name).is_dir():
                setattr(src, field, path / name)
        run_base = run_folder.RunFolder(path.parent.parent).base
        if kind == "checkpoint" and src.base_dir is None and run_base.is_dir():
            src.base_dir = run_base  # a checkpoint's adapter goes on its run's converted model
        if src.adapter_dir is not None and src.base_dir is None and src.model_dir is None:
            raise T2RError(f"{path} has adapter/ but neither base/ (the converted model the adapter goes on) nor "
                           "model/ (the merged model); the run output is incomplete: export a complete run or "
                           "checkpoint")
    elif (path / "config.json").is_file():
        config = read_json(path / "config.json", "the model config")
        if config.get("model_type") != "t2r":
            raise T2RError(
                f"{path / 'config.json'} has model_type {config.get('model_type')!r}, not 't2r': this is not a "
                f"converted model. Convert it first (t2r convert {path} --out DIR), or pass a t2r folder; {SOURCE_HELP}")
        src = Source(path, "export" if (path / MANIFEST).is_file() else "converted", model_dir=path)
    elif (path / ADAPTER_CONFIG).is_file():
        if (path / MANIFEST).is_file():
            return Source(path, "adapter-export", adapter_dir=path)
        raise T2RError(f"{path} is a LoRA adapter folder; pass the run output (or checkpoint) that holds it next "
                       f"to base/ (e.g. {path.parent}), so the export knows which model it goes on")
    elif path.name == run_folder.CHECKPOINTS and run_folder.checkpoint_folders(path):
        latest = run_folder.checkpoint_folders(path)[-1].name
        raise T2RError(f"{path} holds several checkpoints; pass one of them (e.g. {path / latest}) or the run output "
                       f"({path.parent})")
    elif (path / run_folder.TRAINER_STATE).is_file():
        raise T2RError(f"{path} holds only training state (trainer_state.json), no model/ folder to export; export "
                       "the run's output folder once the run has finished (or a checkpoint that has model/)")
    else:
        raise T2RError(f"{path} is not a t2r folder: it has no config.json, model/ or adapter/; {SOURCE_HELP}")
    src.hub_id = repo
    src.summary_path = _find_summary(path, src.kind)
    if src.summary_path is not None:
        src.summary = read_json(src.summary_path, "the run summary")
    return src


def refuse_pickles(folder: Path) -> None:
    """Weights come only from safetensors: a folder holding pickle files is refused, not half-read."""
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise T2RError(
            f"{folder / pickles[0]}: refusing a pickle file (loading one can run arbitrary code); t2r reads weights "
            "only from safetensors. Delete it" + (f" (and {', '.join(pickles[1:])})" if len(pickles) > 1 else "")
            + " if the folder has *.safetensors weights, or re-save the model with save_pretrained, which writes "
            "safetensors")


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (single file, or shards named in the index)."""
    from safetensors import SafetensorError, safe_open

    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = read_json(index, "the weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise T2RError(f"{index} has no weight_map; the weights are incomplete: {REMAKE}")
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS).is_file():
        files, weight_map = [WEIGHTS], None
    else:
        raise T2RError(f"{folder} has no {WEIGHTS} (nor a sharded {WEIGHTS_INDEX}); the folder is incomplete: "
                       f"{REMAKE}")
    located: dict[str, Path] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise T2RError(f"{path} is missing (named in {index.name}); the folder is incomplete: "
                           f"{REMAKE}")
        try:
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise T2RError(f"{path} is not a readable safetensors file ({e}); the folder is damaged: {REMAKE}")
        for k in keys:
            located[k] = path
    if weight_map is not None:
        listed_missing = sorted(k for k, f in weight_map.items() if k not in located or located[k].name != f)
        if listed_missing:
            raise T2RError(f"{index}: tensor {listed_missing[0]} is listed in {weight_map[listed_missing[0]]} but is "
                           f"not there; the folder is damaged: {REMAKE}")
    return located


def tensor_shapes(located: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the files (read from the headers, no tensor data)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(located.values())):
        try:
            with safe_open(path, "pt") as f:
                for k in f.keys():
                    shapes[k] = tuple(f.get_slice(k).get_shape())
        except (SafetensorError, OSError) as e:
            raise T2RError(f"{path} is not a readable safetensors file ({e}); the folder is damaged: {REMAKE}")
    return shapes


def _describe(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def compare_tensors(expected: dict[str, tuple[int, ...]], located: dict[str, Path], config_file: Path,
                    optional: set[str] = frozenset(), implied_by: str | None = None,
                    what_to_do: str | None = None) -> None:
    """Raise T2RError naming the file and tensor when the files and their config disagree."""
    shapes = tensor_shapes(located)
    missing = sorted(set(expected) - set(shapes) - set(optional))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(expected[k]) != shapes[k])
    implied_by = implied_by or str(config_file)
    what_to_do = what_to_do or (
        f"the weights and {config_file.name} disagree: if {config_file.name} was edited, restore the one saved with "
        f"these weights; otherwise the folder is damaged or from another model: {REMAKE}")
    if wrong:
        k = wrong[0]
        raise T2RError(f"{located[k]}: tensor {k} has shape {list(shapes[k])}, but {implied_by} implies "
                       f"{list(expected[k])}" + (f" ({len(wrong)} tensors differ)" if len(wrong) > 1 else "")
                       + f"; {what_to_do}")
    if missing:
        files = ", ".join(sorted({p.name for p in located.values()}))
        raise T2RError(f"{config_file.parent}: {files} lacks {len(missing)} tensor(s) that {implied_by} "
                       f"needs: {_describe(missing)}; {what_to_do}")
    if unexpected:
        k = unexpected[0]
        raise T2RError(f"{located[k]}: {len(unexpected)} tensor(s) that {implied_by} has no place for: "
                       f"{_describe(unexpected)}; {what_to_do}")


def load_config(folder: Path):
    """The T2RConfig of a converted folder, with a clear error when config.json is not one."""
    from ..models import T2RConfig

    path = folder / "config.json"
    if not path.is_file():
        raise T2RError(f"{folder} has no config.json; {SOURCE_HELP}")
    data = read_json(path, "the model config")
    if data.get("model_type") != "t2r":
        raise T2RError(f"{path} has model_type {data.get('model_type')!r}, not 't2r'; {SOURCE_HELP}")
    try:
        return T2RConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as e:
        raise T2RError(f"{path}: {e}; restore the config.json saved with these weights")


def expected_model_tensors(config) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every tensor the model saves, names that may be absent: tied lm_head)."""
    from ..models import T2RForCausalLM

    with torch.device("meta"):
        model = T2RForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return shapes, optional


def validate_model_folder(folder: Path):
    """Check a converted folder's weights against its config.json; return the config."""
    refuse_pickles(folder)
    config = load_config(folder)
    expected, optional = expected_model_tensors(config)
    compare_tensors(expected, weight_files(folder), folder / "config.json", optional)
    return config


def load_model(folder: Path, dtype: torch.dtype | str = "auto"):
    """A validated converted folder as a T2RForCausalLM, from safetensors only."""
    from ..models import T2RForCausalLM

    validate_model_folder(folder)
    return T2RForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=dtype).eval()


@contextlib.contextmanager
def _quiet_peft():
    """peft warns that the adapter's recorded base path differs (it is stale by design: the base is
    SOURCE/base) and transformers about a deprecated name peft calls; neither is the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def read_lora_config(adapter_dir: Path):
    from peft import LoraConfig

    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise T2RError(f"{adapter_dir} has no {ADAPTER_CONFIG}; the adapter is incomplete: export again from the run")
    data = read_json(path, "the adapter config")
    if data.get("peft_type") != "LORA":
        raise T2RError(f"{path}: peft_type {data.get('peft_type')!r}; t2r exports LoRA adapters only")
    try:
        return LoraConfig.from_pretrained(adapter_dir)
    except (TypeError, ValueError) as e:
        raise T2RError(f"{path}: not a LoRA config peft can read ({e})")


def validate_adapter(adapter_dir: Path, base_config, base_dir: Path | None = None) -> None:
    """Check the adapter's tensors against the LoRA layers its config puts on the base model."""
    from peft import get_peft_model, get_peft_model_state_dict

    from ..models import T2RForCausalLM

    refuse_pickles(adapter_dir)
    lora = read_lora_config(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise T2RError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}; the adapter is incomplete: export again from the run")
    with torch.device("meta"), _quiet_peft():
        peft_model = get_peft_model(T2RForCausalLM(base_config), lora)
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    weights = adapter_dir / ADAPTER_WEIGHTS
    located = {k: weights for k in tensor_shapes({"": weights})}  # one file: every tensor is in it
    base_json = (base_dir / "config.json") if base_dir is not None else Path("the base config.json")
    compare_tensors(expected, located, adapter_dir / ADAPTER_CONFIG,
                    implied_by=f"the base model's {base_json} with {ADAPTER_CONFIG}",
                    what_to_do=f"the adapter does not fit the model in {base_json.parent}: it was trained on another "
                               "base (or a config was edited); export the run output the adapter came from, whose "
                               "base/ is the model it was trained on")


def load_merged(base_dir: Path, adapter_dir: Path):
    """base + LoRA adapter merged into one T2RForCausalLM, merged in fp32; returns (model, base dtype)."""
    from peft import PeftModel

    base_config = validate_model_folder(base_dir)
    validate_adapter(adapter_dir, base_config, base_dir)
    base = load_model(base_dir, dtype=torch.float32)
    saved_dtype = getattr(base_config, "dtype", None)
    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
        merged = peft_model.merge_and_unload()
    return merged.eval(), saved_dtype
