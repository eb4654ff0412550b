"""Held-out perplexity: exp(total next-token loss / tokens), reduced over every process."""
from __future__ import annotations

import contextlib
import math

import torch

from ..models.modeling_t2r import causal_lm_loss, next_token_targets
from ..train.data import collate
from ..train.stages import teacher_weights


def _sum_over_processes(values: torch.Tensor, accelerator) -> torch.Tensor:
    return accelerator.reduce(values, reduction="sum") if accelerator is not None else values


@torch.no_grad()
def perplexity(model, rows: list[dict], batch_size: int, pad_id: int, device, accelerator=None,
               teacher: bool = False) -> tuple[float, int]:
    """(perplexity, tokens scored) of ``model`` on ``rows`` (packed rows of the held-out split).

    Each process scores its share of the rows. ``teacher=True`` scores the teacher: the same
    weights with LoRA adapters disabled and every GSA layer running softmax attention.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = rows[rank::world]
    core = accelerator.unwrap_model(model) if accelerator is not None else model
    modes = teacher_weights(core) if teacher else contextlib.nullcontext()
    was_training = core.training
    core.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with modes:
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(device) for k, v in collate(mine[i:i + batch_size], pad_id).items()}
            labels = batch.pop("labels")
            logits = core(**batch, use_cache=False).logits
            totals[0] += causal_lm_loss(logits, labels, batch.get("cu_seqlens"), reduction="sum").double()
            totals[1] += (next_token_targets(labels, batch.get("cu_seqlens")) != -100).sum()
    core.train(was_training)
    totals = _sum_over_processes(totals, accelerator)
    if totals[1] == 0:
        return float("nan"), 0
    return math.exp(totals[0].item() / totals[1].item()), int(totals[1].item())
