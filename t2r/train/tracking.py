"""Where a finetune run's numbers go: OUTPUT/metrics.jsonl (one line per optimizer step, always) and
the trackers accelerate logs to (TensorBoard, wandb), when asked for and installed."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from .config import RunConfig


def tracker_config(config: RunConfig, out: Path) -> dict:
    """The whole validated run config for the trackers (wandb's run config, TensorBoard's hparams), flattened to
    dotted keys of scalar values (``stages.1.lora.rank``), which is all TensorBoard takes; empty lists and dicts
    as "[]" / "{}". With the run's output folder and total step count."""
    flat = {}

    def walk(key, value):
        if isinstance(value, (dict, list)) and value:
            for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
                walk(f"{key}.{k}" if key else str(k), v)
        else:
            flat[key] = json.dumps(value) if isinstance(value, (dict, list)) else value

    walk("", config.model_dump(mode="json"))
    return {**flat, "output_dir": str(out), "total_steps": config.total_steps}


def use_wandb(config: RunConfig) -> bool:
    choice = config.logging.wandb
    if choice != "auto":
        return choice
    return importlib.util.find_spec("wandb") is not None and bool(
        os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def use_tensorboard(config: RunConfig, log) -> bool:
    """TensorBoard logs when asked for and installed; when asked for and missing, say so (the run goes on,
    with metrics.jsonl)."""
    if not config.logging.tensorboard:
        return False
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        if int(os.environ.get("RANK", "0")) == 0:
            log("warning: logging.tensorboard is on but tensorboard is not installed (pip install tensorboard, or "
                "t2r[tensorboard]); logging to OUTPUT/metrics.jsonl only. Set logging.tensorboard: false to silence this")
        return False
    return True


def trackers(config: RunConfig, log) -> list[str]:
    """accelerate's ``log_with`` for this run."""
    return (["tensorboard"] if use_tensorboard(config, log) else []) + (["wandb"] if use_wandb(config) else [])


class MetricsFile:
    """OUTPUT/metrics.jsonl: one JSON line per optimizer step (written by the main process only)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []

    def trim(self, last_step: int) -> None:
        """After a resume, forget the steps after ``last_step`` (those the checkpoint does not hold)."""
        if self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def median_tokens_per_s(self, stage_names) -> dict:
        """Median training tokens/s of each stage (its first step, which warms up, left out)."""
        rows = self.rows()
        return {name: _median([r["tokens_per_s"] for r in rows if r["stage"] == name][1:]) for name in stage_names}


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None
