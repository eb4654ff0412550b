"""Upload an export folder to the Hugging Face Hub: ``create_repo`` then ``upload_folder``.

The token is huggingface_hub's to find (``HF_TOKEN``, or the login saved by ``hf auth login``).
t2r never passes it around, prints it, logs it or writes it: it only asks whether there is one
(to fail before a long export) and scrubs it from any error text it passes on.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from ..errors import T2RError
from .load import ADAPTER_CONFIG, EXPORT_PATTERNS, MANIFEST, read_json

BRANCH = re.compile(r"^(?!.*\.\.)(?!/)(?!.*//)[\w.-][\w./-]*(?<![/.])$")
# the files t2r writes metadata into (config.json's fields, the manifest, the adapter config)
METADATA_FILES = ("config.json", "generation_config.json", ADAPTER_CONFIG, MANIFEST)
# an absolute path in prose (not inside a URL or a dtype list such as float32/bfloat16)
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:~|[A-Za-z]:)?[/\\](?:[\w.+-]+[/\\])+[\w.+-]*")


def retry_command(folder: Path, repo_id: str, private: bool, revision: str | None = None,
                  commit_message: str | None = None) -> str:
    """The command that uploads an existing export (SOURCE an export folder, no --out)."""
    return shlex.join(["t2r", "export", str(Path(folder).resolve()), "--push-to-hub", repo_id]
                      + (["--private"] if private else []) + (["--revision", revision] if revision else [])
                      + (["--commit-message", commit_message] if commit_message else []))


def _scrub(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def check_push(repo_id: str, revision: str | None = None) -> None:
    """Fail before exporting when the upload cannot start: a bad repo id or branch name, or no token at all."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise T2RError(f"--push-to-hub {repo_id!r} is not a Hub repo id; use ORG/NAME ({_scrub(str(e))})") from None
    if revision is not None and not BRANCH.match(revision):
        raise T2RError(f"--revision {revision!r} is not a branch name; use letters, digits and . _ - / "
                       "(e.g. --revision v2)")
    if get_token() is None:
        raise T2RError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`, then run the "
                       "command again (nothing was exported)")


def local_paths(folder: Path) -> list[tuple[Path, str]]:
    """(file, path) for each path of this machine the export's card and metadata name: a pushed repo must
    not (it means nothing elsewhere and tells about this machine). Tokenizer files and the generated
    modeling code are copied verbatim and not scanned (a vocabulary may hold path-like tokens)."""
    found = []
    card = folder / "README.md"
    if card.is_file():
        found += [(card, m.group(0)) for m in ABSOLUTE_PATH.finditer(card.read_text(encoding="utf-8"))]
    for name in METADATA_FILES:
        if (folder / name).is_file():
            found += [(folder / name, v) for v in _strings(read_json(folder / name, name))
                      if v.startswith(("/", "~/", "\\\\")) or re.match(r"^[A-Za-z]:[\\/]", v)]
    return found


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


def push_folder(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, log=print) -> str:
    """Create ``repo_id`` (and the branch ``revision``) if needed and upload ``folder``, deleting the files of
    an export's kinds that an earlier push left and this export lacks; return the repo URL."""
    from huggingface_hub import HfApi

    leaks = local_paths(folder)
    if leaks:
        file, path = leaks[0]
        raise T2RError(f"{file} names the local path {path}, which a pushed model must not; export again with this "
                       "t2r (adapters: with --base-id ORG/BASE), then push the new export. Nothing was uploaded")
    api = HfApi()
    where = repo_id + (f" (branch {revision})" if revision else "")
    log(f"uploading {folder} to {where}" + (" (private)" if private else ""))
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id=repo_id, repo_type="model", branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), revision=revision,
                          commit_message=commit_message or f"Upload {folder.name} (t2r export)",
                          delete_patterns=EXPORT_PATTERNS)
    except Exception as e:  # network, auth, quota...: the local export stays as it is
        reason = _scrub(f"{type(e).__name__}: {e}".strip().splitlines()[0])
        raise T2RError(
            f"uploading to {repo_id} failed ({reason}). The export in {folder} is complete and untouched; "
            f"retry the upload with:\n  {retry_command(folder, repo_id, private, revision, commit_message)}") from None
    url = str(url) if url else f"https://huggingface.co/{repo_id}"
    log(f"pushed to {url}" + (f" (branch {revision})" if revision else ""))
    return url
