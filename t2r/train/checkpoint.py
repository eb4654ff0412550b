"""Atomic, resumable checkpoints: OUTPUT/checkpoints/step-NNNNNNN/ (+ OUTPUT/checkpoints/latest).

A checkpoint is written whole into a temporary folder and renamed into place; the ``latest``
pointer is replaced atomically after that. A crash, a kill or a full disk at any moment leaves
the previous checkpoint complete and pointed to.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import T2RError
from .run_folder import ACCELERATE_STATE, LATEST, TRAINER_STATE, RunFolder, checkpoint_folders, checkpoint_name


@dataclass
class TrainerState:
    """Where a run stands: what is needed to continue exactly where it stopped."""

    stage: int = 0  # index into config.stages
    stage_step: int = 0  # optimizer steps done in that stage
    step: int = 0  # optimizer steps done in the run
    data_position: int = 0  # training rows consumed (global)
    tokens_seen: int = 0
    stage_start_tokens: int = 0  # tokens_seen when the current stage began
    evals: dict = field(default_factory=dict)  # teacher_ppl, converted_ppl_before, ...
    stage_summaries: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        return cls(**json.loads(text))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoints_dir(output_dir: Path) -> Path:
    return RunFolder(output_dir).checkpoints


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    done = [p for p in checkpoint_folders(root) if (p / TRAINER_STATE).is_file()]
    return done[-1] if done else None


def checkpoint_damage(folder: Path) -> str | None:
    """What makes a checkpoint unusable (a trainer state that does not parse, a weights or optimizer
    file that is truncated or empty), or None when it reads. Reads headers only."""
    from safetensors import SafetensorError, safe_open

    try:
        read_trainer_state(folder)
    except (OSError, ValueError, TypeError, T2RError) as e:
        return f"{TRAINER_STATE} does not read ({e})"
    for f in sorted((folder / ACCELERATE_STATE).rglob("*")):
        if not f.is_file():
            continue
        if f.stat().st_size == 0:
            return f"{f.name} is empty"
        if f.suffix == ".safetensors":
            try:
                with safe_open(f, "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                return f"{f.name} does not read ({e})"
    return None


def intact_checkpoint(output_dir: Path, log=print) -> Path | None:
    """The newest checkpoint that reads; a damaged newer one is named and skipped."""
    root = checkpoints_dir(output_dir)
    newest = latest_checkpoint(output_dir)
    candidates = [p for p in reversed(checkpoint_folders(root)) if newest is None or p.name <= newest.name]
    for folder in candidates:
        damage = checkpoint_damage(folder)
        if damage is None:
            return folder
        log(f"warning: checkpoint {folder.name} is damaged ({damage}); trying the one before it")
    return None


class _SharedTensorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()  # accelerate may prefix "[RANK n] "


@contextlib.contextmanager
def _tied_weights_quiet():
    """accelerate's safetensors save warns "Removed shared tensor ... check by verifying ..." at every checkpoint
    of a model with tied embeddings (lm_head.weight is embed_tokens.weight): safetensors stores the one tensor
    once, and loading ties it again (resume restores it). Silenced on accelerate's logger for this call only."""
    logger, quiet = logging.getLogger("accelerate.utils.other"), _SharedTensorFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, keep_last: int, extra=None) -> Path:
    """Write the accelerate state (model, optimizer, RNG) and the trainer state, atomically.

    ``extra(folder)`` may add files (called on the main process). Raises OSError when the write
    fails; the previous checkpoint is then untouched.
    """
    root = checkpoints_dir(output_dir)
    name = checkpoint_name(state.step)
    final, tmp = root / name, root / f"{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with _tied_weights_quiet():
            accelerator.save_state(str(tmp / ACCELERATE_STATE), safe_serialization=True)
        if accelerator.is_main_process:
            if extra is not None:
                extra(tmp)
            _write_atomic(tmp / TRAINER_STATE, state.to_json())
    except OSError:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, name)
        done = checkpoint_folders(root)
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(folder: Path) -> TrainerState:
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        raise T2RError(f"{folder} is not a complete checkpoint (no {TRAINER_STATE})")
    return TrainerState.from_json(state_file.read_text())
