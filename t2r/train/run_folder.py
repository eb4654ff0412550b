"""The run folder contract: what ``t2r finetune`` writes under OUTPUT, named once for every writer
and reader (the loop, checkpoints, ``t2r export``, ``t2r eval``, scripts and tests).

OUTPUT/
  config.yaml           the validated run config (a resume checks itself against it)
  metrics.jsonl         one line per optimizer step
  run_summary.json      written when the run ends
  model/                the final model (with LoRA: merged)
  base/                 with LoRA: the converted model the adapter goes on top of
  adapter/              with LoRA: the adapter (and the new GSA modules in full)
  checkpoints/
    step-NNNNNNN/       accelerate/ (model, optimizer, RNG), trainer_state.json, and
                        model/ or adapter/ (what ``t2r export`` takes from a checkpoint)
    latest              the name of the newest complete checkpoint
  profile.txt           with logging.profile_steps: where the profiled steps' time went
  logs/                 the trackers' files (TensorBoard)
  cache/                the tokenized data (unless data.cache_dir)
  .lock                 the pid of the run writing here
"""
from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "run_summary.json"
MODEL = "model"
BASE = "base"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
LOGS = "logs"
CACHE = "cache"
LOCK = ".lock"
PROFILE = "profile.txt"
# inside a checkpoint
TRAINER_STATE = "trainer_state.json"
ACCELERATE_STATE = "accelerate"
CHECKPOINT_GLOB = "step-*"


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after optimizer step ``step``: step-0000009."""
    return f"step-{step:07d}"


class RunFolder:
    """OUTPUT of a finetune run: the path of each thing the run writes there."""

    def __init__(self, root):
        self.root = Path(root)

    config = property(lambda self: self.root / CONFIG)
    metrics = property(lambda self: self.root / METRICS)
    summary = property(lambda self: self.root / SUMMARY)
    model = property(lambda self: self.root / MODEL)
    base = property(lambda self: self.root / BASE)
    adapter = property(lambda self: self.root / ADAPTER)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    logs = property(lambda self: self.root / LOGS)
    cache = property(lambda self: self.root / CACHE)
    lock = property(lambda self: self.root / LOCK)
    profile = property(lambda self: self.root / PROFILE)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)


def checkpoint_folders(checkpoints: Path) -> list[Path]:
    """The checkpoint folders in OUTPUT/checkpoints, oldest first (not the temporary ones being written;
    complete or not)."""
    return sorted(p for p in Path(checkpoints).glob(CHECKPOINT_GLOB) if p.is_dir() and not p.name.endswith(".tmp"))


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint of a run: OUTPUT/checkpoints/step-N."""
    return Path(folder).parent.name == CHECKPOINTS
