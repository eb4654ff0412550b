"""Upload an export folder to the Hugging Face Hub: ``create_repo`` then ``upload_folder``.

The token is huggingface_hub's to find (``HF_TOKEN``, or the login saved by ``hf auth login``).
t2r never passes it around, prints it, logs it or writes it: it only asks whether there is one
(to fail before a long export) and scrubs it from any error text it passes on.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from ..hub import T2RError


def retry_command(folder: Path, repo_id: str, private: bool) -> str:
    """The command that uploads an existing export (SOURCE an export folder, no --out)."""
    return shlex.join(["t2r", "export", str(Path(folder).resolve()), "--push-to-hub", repo_id]
                      + (["--private"] if private else []))


def _scrub(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def check_push(repo_id: str) -> None:
    """Fail before exporting when the upload cannot start: a bad repo id, or no token at all."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise T2RError(f"--push-to-hub {repo_id!r} is not a Hub repo id; use ORG/NAME ({_scrub(str(e))})") from None
    if get_token() is None:
        raise T2RError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`, then run the "
                       "command again (nothing was exported)")


def push_folder(folder: Path, repo_id: str, private: bool = False, log=print) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` to it; return the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    log(f"uploading {folder} to {repo_id}" + (" (private)" if private else ""))
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          commit_message=f"Upload {folder.name} (t2r export)")
    except Exception as e:  # network, auth, quota...: the local export stays as it is
        reason = _scrub(f"{type(e).__name__}: {e}".strip().splitlines()[0])
        raise T2RError(
            f"uploading to {repo_id} failed ({reason}). The export in {folder} is complete and untouched; "
            f"retry the upload with:\n  {retry_command(folder, repo_id, private)}") from None
    url = str(url) if url else f"https://huggingface.co/{repo_id}"
    log(f"pushed to {url}")
    return url
